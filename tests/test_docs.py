"""The README's figures are the findings page's: its methods table is made from docs/findings/methods_rt6.md."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_table", ROOT / "docs" / "findings" / "readme_table.py")
readme_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_table)


def test_the_readmes_methods_table_is_the_one_the_findings_page_gives():
    assert readme_table.main(["--check"]) == 0


def test_the_readme_table_takes_the_dev_interval_of_the_paired_table_not_the_test_one(tmp_path):
    """The report's paired table has two columns named "95% CI" (dev, then test): the README shows the dev one."""
    page = tmp_path / "m.md"
    page.write_text("\n".join([
        "| method | method.optim.lr_ratio | best dev acc | dev 95% CI | test acc | test 95% CI | trainable | trainable % | n |",
        "|---|---|---|---|---|---|---|---|---|",
        "| finetune |  | 0.8600 ± 0.0010 | [0.85, 0.87] | 0.8700 ± 0.0060 | [0.85, 0.88] | 1,000 | 99.000 | 3 |",
        "| lora | 16.0 | 0.8500 ± 0.0080 | [0.83, 0.87] | 0.8400 ± 0.0070 | [0.82, 0.86] | 10 | 0.100 | 3 |",
        "| lora | 1.0 | 0.8400 ± 0.0080 | [0.82, 0.86] | 0.8300 ± 0.0070 | [0.81, 0.85] | 10 | 0.100 | 3 |",
        "",
        "| method | method.optim.lr_ratio | Δ best dev acc | 95% CI | Δ test acc | 95% CI | seeds |",
        "|---|---|---|---|---|---|---|",
        "| lora | 16.0 | -0.0100 | [-0.0200, +0.0000] | -0.0300 | [-0.0900, +0.0300] | 3 |",
        "| lora | 1.0 | -0.0200 | [-0.0300, -0.0100] | -0.0400 | [-0.0800, +0.0000] | 3 |",
    ]) + "\n")
    rows = readme_table.block(page).splitlines()[3:-1]
    assert rows == [
        "| full fine-tuning (`finetune`) | 1,000 (99.000%) | 0.8600 ± 0.0010 | 0.8700 ± 0.0060 | (the reference) | 3 |",
        "| LoRA+ (`lora`, `method.optim.lr_ratio=16.0`) | 10 (0.100%) | 0.8500 ± 0.0080 | 0.8400 ± 0.0070 "
        "| -0.0100 [-0.0200, +0.0000] | 3 |",
        "| LoRA (`lora`) | 10 (0.100%) | 0.8400 ± 0.0080 | 0.8300 ± 0.0070 | -0.0200 [-0.0300, -0.0100] | 3 |",
    ]
