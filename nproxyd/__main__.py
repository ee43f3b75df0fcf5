from nproxyd.cli import main

raise SystemExit(main())
