import gc

# No cyclic collection while the command line is imported: start-up allocates hundreds of
# thousands of objects that all stay alive, and collecting them took ~7 % of the import time
# (docs/benchmarks.md "Start-up"). ``main`` pauses it again for the daemon's own imports and
# resumes it after them.
gc.disable()
try:
    from nproxyd.cli import main
finally:
    gc.enable()

raise SystemExit(main())
