"""Every dataset and packaged checkpoint has a card in the shared template."""

import re

from medai.io.data import DATASETS
from medai.models.pretrained import packaged_weights
from medai.utils import shipped_file

CARDS = shipped_file("data_cards/README.md").parent
SECTIONS = ["## Source", "## Licence", "## Modality and format", "## Size", "## Splits", "## Use in medai",
            "## Known defects and caveats", "## Checksums"]


def test_each_dataset_has_a_card_naming_its_path():
    for name, rel in DATASETS.items():
        card = CARDS / "datasets" / f"{name}.md"
        assert card.is_file(), f"no card for dataset {name}"
        text = card.read_text()
        assert re.search(rf"^Name: {re.escape(name)}$", text, re.M), card
        assert re.search(rf"^Path: {re.escape(rel)}/?$", text, re.M), card
        for section in SECTIONS:
            assert section in text, f"{card}: missing {section}"


def test_each_packaged_checkpoint_has_a_card_with_limits():
    names = {p.read_text().split("Name: ", 1)[1].split("\n", 1)[0].strip() for p in (CARDS / "checkpoints").glob("*.md")}
    for key in packaged_weights():
        assert key in names, f"no card for packaged weights {key}"
    for card in (CARDS / "checkpoints").glob("*.md"):
        assert "## Limits" in card.read_text(), card
