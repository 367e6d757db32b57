"""The README's table reference is the schema the code writes."""

from pathlib import Path

from cbir.schemas import SCHEMAS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def documented_columns(table: str) -> list[tuple[str, str, str]]:
    section = README.split(f"### {table}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip().strip("`") for cell in row.strip("|").split("|")) for row in rows]


def test_every_table_schema_is_documented_exactly():
    for name, schema in SCHEMAS.items():
        expected = [(f.name, str(f.type).replace("item: ", ""), f.metadata[b"doc"].decode()) for f in schema]
        assert documented_columns(name) == expected
