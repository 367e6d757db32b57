"""The table reference (docs/reference.md) is the schema the code writes."""

from pathlib import Path

from cbir.schemas import RESULTS, SCHEMAS, features_schema

REFERENCE = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()


def documented_columns(table: str) -> list[tuple[str, str, str]]:
    section = REFERENCE.split(f"### {table}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip().strip("`") for cell in row.strip("|").split("|")) for row in rows]


def test_every_table_schema_is_documented_exactly():
    tables = {**SCHEMAS, "features": features_schema(4096, "float16"), "results and errors (of a query run)": RESULTS}
    for name, schema in tables.items():
        documented = documented_columns(name)
        assert [(column, kind) for column, kind, _ in documented] == [
            (f.name, str(f.type).replace("item: ", "")) for f in schema
        ]
        for (_, _, meaning), field in zip(documented, schema):
            assert meaning.startswith(field.metadata[b"doc"].decode())


def test_every_setting_is_documented():
    from pydantic import BaseModel

    from cbir.settings import Settings

    keys = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys += [f"{name}.{key}" for key in section.model_fields]
        elif name != "profile":  # chosen with --profile, not set
            keys.append(name)
    assert [key for key in keys if f"`{key}" not in REFERENCE] == []
