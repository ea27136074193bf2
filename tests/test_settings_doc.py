"""docs/settings.md names every Q4KDISTILL_* environment variable the package, kernels and scripts read."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SETTINGS = {"Q4KDISTILL_WGMMA_OPS_CUH", "Q4KDISTILL_BLOCK_LAYOUTS_CUH", "Q4KDISTILL_COMMON_CUH",
                "Q4KDISTILL_WGMMA_PTX_CUH"}           # include guards of csrc headers


def test_every_setting_is_documented():
    used = set()
    for folder in ("q4kdistill", "kernels", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"Q4KDISTILL_[A-Z0-9_]+", path.read_text()))
    doc = (ROOT / "docs" / "settings.md").read_text()
    missing = sorted(v for v in used - NOT_SETTINGS if v not in doc)
    assert not missing, f"docs/settings.md does not name {missing}"
