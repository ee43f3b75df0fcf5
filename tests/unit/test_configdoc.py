"""docs/configuration.md and config/nproxyd.example.toml follow the configuration Structs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nproxyd.core import config, configdoc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "nproxyd.example.toml"
REFERENCE = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m nproxyd.core.configdoc > docs/configuration.md"


class TestGeneratedReference:
    def test_reference_is_up_to_date(self) -> None:
        """docs/configuration.md is exactly what the generator renders from Structs and example."""
        expected = configdoc.render_configuration_markdown(EXAMPLE.read_text(encoding="utf-8"))
        assert REFERENCE.read_text(encoding="utf-8") == expected, f"stale: run `{REGENERATE}`"

    def test_default_example_path_is_the_repository_example(self) -> None:
        """Without an argument the generator reads config/nproxyd.example.toml."""
        assert configdoc.EXAMPLE_PATH == EXAMPLE
        assert configdoc.render_configuration_markdown() == REFERENCE.read_text(encoding="utf-8")

    def test_every_key_is_documented_with_its_env_variable(self) -> None:
        """Each key of the Structs has a row naming its NPROXYD__ variable in the reference."""
        text = REFERENCE.read_text(encoding="utf-8")
        sections = configdoc.config_sections()
        assert sections
        for section, docs in sections:
            assert f"## `[{section}]`" in text
            for doc in docs:
                assert f"| `{doc.env_name}` |" in text, doc.dotted

    def test_documented_env_variables_are_accepted(self) -> None:
        """Setting each documented variable to the documented default loads that default."""
        sections = configdoc.config_sections()
        assert sections
        for _, docs in sections:
            for doc in docs:
                raw = json.loads(doc.default_text)
                value = raw if isinstance(raw, str) else json.dumps(raw)
                loaded = config.load(None, {doc.env_name: value})
                assert loaded == config.load(None, {}), doc.dotted

    def test_types_show_constraints_and_secrets(self) -> None:
        """Types carry their bounds and choices, and secret keys are marked secret."""
        rows = {doc.dotted: doc for _, docs in configdoc.config_sections() for doc in docs}
        assert rows["database.pool_max_size"].type_text == "integer (≥ 2, ≤ 500)"
        assert rows["billing.renewal_lead_time_hours"].type_text == "number (> 0)"
        assert rows["email.smtp.security"].type_text == '`"none"` \\| `"starttls"` \\| `"tls"`'
        assert rows["database.auto_migrate"].default_text == "true"
        for secret_key, _ in config.SECRET_KEYS:
            assert rows[secret_key].type_text == "string, secret"

    def test_missing_description_is_an_error(self) -> None:
        """A key without a comment above it in the example stops the generator, naming the key."""
        example = EXAMPLE.read_text(encoding="utf-8").replace("# Lowest level written.\n", "")
        with pytest.raises(ValueError, match=r"log\.level"):
            configdoc.render_configuration_markdown(example)


class TestExample:
    def test_example_yields_exactly_the_defaults(self) -> None:
        """Loading config/nproxyd.example.toml gives the same Config as loading no file."""
        assert config.load(str(EXAMPLE), {}) == config.load(None, {})

    def test_example_has_every_key(self) -> None:
        """Every key of the Structs appears in the example, and the example has no other."""
        in_example = set(configdoc.parse_example(EXAMPLE.read_text(encoding="utf-8")).keys)
        assert in_example == set(configdoc.all_keys())

    def test_every_key_has_a_one_line_description(self) -> None:
        """The comment above each key of the example is one non-empty line."""
        text = EXAMPLE.read_text(encoding="utf-8")
        lines = text.splitlines()
        for key in configdoc.all_keys():
            assert configdoc.parse_example(text).keys[key], key
        for index, line in enumerate(lines):
            if line and not line.startswith(("#", "[")):
                assert lines[index - 1].startswith("# "), line
                assert not lines[index - 2].startswith("#"), line

    def test_comment_parser_reads_tables_and_keys(self) -> None:
        """Comments right above a table or key describe it; a blank line ends a comment block."""
        parsed = configdoc.parse_example(
            "# file header\n\n# The section.\n[a.b]\n# The key.\nkey = 1\n\nother = 2\n"
        )
        assert parsed.tables == {"a.b": "The section."}
        assert parsed.keys == {"a.b.key": "The key.", "a.b.other": ""}
