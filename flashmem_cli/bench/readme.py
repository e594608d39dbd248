"""Put one `flashmem bench --out DIR` run into the README's Performance section, unedited.

    python -m flashmem_cli.bench.readme bench-results [README.md]

The text between the markers is replaced by DIR/results.md; its plots are copied into
flashmem_cli/bench/figures/ (the README links them there), so no number is typed by hand.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from flashmem_cli.store.files import atomic_write_bytes

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
FIGURES = Path(__file__).parent / "figures"
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)/]+\.png)\)")


def generated_section(results_md: str, figures_link: str) -> str:
    """results.md with its plot links pointed at the committed copies."""
    return IMAGE.sub(lambda m: f"![{m.group(1)}]({figures_link}/{m.group(2)})", results_md)


def replace_between_markers(readme: str, body: str) -> str:
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} block")
    return readme[: start + len(BEGIN)] + "\n" + body.rstrip("\n") + "\n" + readme[end:]


def main(argv: list[str]) -> None:
    results = Path(argv[0])
    readme_path = Path(argv[1]) if len(argv) > 1 else Path("README.md")
    results_md = (results / "results.md").read_text("utf-8")
    FIGURES.mkdir(exist_ok=True)
    for old in FIGURES.glob("*.png"):
        old.unlink()
    for plot in results.glob("*.png"):
        shutil.copy2(plot, FIGURES / plot.name)
    link = FIGURES.relative_to(readme_path.resolve().parent).as_posix()
    body = generated_section(results_md, link)
    updated = replace_between_markers(readme_path.read_text("utf-8"), body)
    atomic_write_bytes(readme_path, updated.encode("utf-8"))


if __name__ == "__main__":
    main(sys.argv[1:])
