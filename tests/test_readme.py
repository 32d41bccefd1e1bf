"""Everything README.md prints runs as printed.

- Every ``python`` block runs on tiny random models: the hook below saves them to local folders
  and replaces each quoted hub id in the block by its folder (the only change), in a folder
  holding a random ``photo.jpg``. The `reference` model's block runs on the shipped model.
- Every line of a ``bash`` block is a command on one of two lists: ``FAST`` ones run here as
  printed (``crossget`` is ``python -m mllm_crossget.cli``, the same entry point); ``SLOW`` ones
  (installs, minutes-long jobs, interactive programs) are checked without running them: their
  flags must parse with the verb's own parser, their make target must exist. A command added to
  the README without being put on a list fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_crossget as crossget
from mllm_crossget import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Printed commands this test runs as they are (each takes seconds).
FAST: tuple[str, ...] = ("crossget --help", "crossget eval --help")
# Printed commands it only checks, with why they are not run here.
SLOW: dict[str, str] = {
    "pip install -e .": "installs the package; CI's fresh clone does it (.ci/run -> make test)",
    "make demo": "the 6-minute demo job; tests/test_demo.py runs its code on a tiny model",
    "make test": "this test suite itself",
    "crossget data make --out data/testbed --train 0 --validation 700 --test 1400 --seed 0": (
        "renders 2,100 questions into the checkout's data/ (tests/test_testbed_data.py makes "
        "splits in a temporary folder)"
    ),
    "crossget eval --model reference --task testbed --data data/testbed --budgets 128,64 "
    "--methods crossget,tome,divprune": "1,400 questions x 6 settings (a few minutes)",
    "python -m eval.recovery_study --model reference --data data/testbed --limit 1400 --steps "
    "600 --batch-size 16 --lr 1e-3 --out runs/recovery-lpa": "five fine-tunes (44 min)",
    "crossget chat --model reference --budget 64": "interactive (reads the terminal)",
    "crossget serve --model reference --budget 64 --port 8000": "serves until stopped "
    "(tests/test_serving.py runs the server)",
}
# The hook: hub ids in the python blocks -> builders of tiny models saved like the real ones.
HUB_IDS = ("llava-hf/llava-1.5-7b-hf", "Salesforce/blip2-opt-2.7b", "openai/clip-vit-base-patch16")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def commands() -> list[str]:
    """Every command line of the bash blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def test_every_printed_command_is_on_a_list() -> None:
    printed = commands()
    assert printed, "no bash blocks found"
    unlisted = [c for c in printed if c not in FAST and c not in SLOW]
    assert unlisted == [], "add these README commands to FAST or SLOW in tests/test_readme.py"
    assert set(FAST) | set(SLOW) == set(printed), "a listed command is no longer in the README"


@pytest.mark.parametrize("command", FAST)
def test_fast_commands_run_as_printed(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "crossget"
    done = subprocess.run(
        [sys.executable, "-m", "mllm_crossget.cli", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def _parser_of(argv: list[str]):  # noqa: ANN202 - an argparse parser
    import importlib

    if argv[0] == "crossget":
        module = importlib.import_module(cli.VERBS[argv[1]][0])
        rest = argv[2:]
    else:
        assert argv[:2] == ["python", "-m"], argv
        module = importlib.import_module(argv[2])
        rest = argv[3:]
    build = getattr(module, "build_parser", None) or module._build_parser
    return build(), rest


@pytest.mark.parametrize("command", sorted(SLOW))
def test_slow_commands_are_well_formed(command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert argv[1] in targets
        return
    if argv[0] == "pip":
        assert argv[1:] == ["install", "-e", "."]
        assert 'crossget = "mllm_crossget.cli:main"' in (ROOT / "pyproject.toml").read_text()
        return
    parser, rest = _parser_of(argv)
    parser.parse_args(rest)  # an unknown flag or a bad value exits here


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_blip2 import NUM_QUERIES, tiny_blip2
    from test_clip_adapters import tiny_hf_clip
    from tiny_models import tiny_llava, tiny_processor
    from transformers import Blip2Processor, BlipImageProcessor

    root = tmp_path_factory.mktemp("hub")
    folders = {name: root / name.replace("/", "--") for name in HUB_IDS}
    llava = folders["llava-hf/llava-1.5-7b-hf"]
    # 112 px, 7 px patches: 256 visual tokens, so the snippet's budget of 144 is a real cut
    tiny_llava(image_size=112).save_pretrained(llava)
    tiny_processor(image_size=112).save_pretrained(llava)
    blip2 = folders["Salesforce/blip2-opt-2.7b"]
    tiny_blip2().save_pretrained(blip2)
    Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 56, "width": 56}),
        tokenizer=tiny_processor().tokenizer,
        num_query_tokens=NUM_QUERIES,
    ).save_pretrained(blip2)
    tiny_hf_clip().save_pretrained(folders["openai/clip-vit-base-patch16"])
    return folders


@pytest.fixture
def in_photo_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippets_run(
    index: int, hub_folders: dict[str, Path], in_photo_folder: Path
) -> None:
    code = blocks("python")[index]
    for name, folder in hub_folders.items():
        code = code.replace(f'"{name}"', repr(str(folder)))
    assert not re.search(r'"[\w.-]+/[\w.-]+"', code), "a hub id the hook does not know"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    model = namespace.get("model")
    if isinstance(model, torch.nn.Module) and "crossget.remove" not in code:
        assert crossget.is_applied(model)


def test_snippet_hub_ids_are_the_hook_ones() -> None:
    """Each hub id the README uses is one the hook replaces, and each snippet family is there."""
    used = set(re.findall(r'"([\w.-]+/[\w.-]+)"', "\n".join(blocks("python"))))
    assert used == set(HUB_IDS)


def test_front_page_shape() -> None:
    lines = README.splitlines()
    assert len(lines) <= 300
    command_line = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    verbs = re.findall(r"^\| `([\w-]+)` \|", command_line, flags=re.M)
    assert sorted(verbs) == sorted(cli.VERBS), "README's verb table must list every verb once"
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to a missing {target}"
    missing = [name for name in crossget.SUPPORTED_MODELS if f"`{name}`" not in README]
    assert missing == [], "add a row for each family to README's 'Supported models' table"
    assert "`<image>\\nUSER: {q} ASSISTANT:`" in README
