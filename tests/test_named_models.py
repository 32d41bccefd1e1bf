"""`--model` names resolve in one library registry, offline, without importing eval/ or recipes/."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mllm_crossget import cli, named_models
from mllm_crossget.named_models import NamedModel, UnknownModelError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test if anything asks whether the hub is reachable; records hub-cache lookups."""
    looked_up: list[str] = []

    def refuse(*_: object, **__: object) -> bool:
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(named_models, "_hub_reachable", refuse)
    monkeypatch.setattr(named_models, "_in_hub_cache", lambda repo: looked_up.append(repo) or False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return looked_up


def test_reference_is_the_shipped_folder_the_testbed_uses() -> None:
    from eval.testbed.model import DEFAULT_PATH, PROMPT_TEMPLATE

    entry = named_models.get("reference")
    assert entry is not None and entry.folder() == DEFAULT_PATH
    assert entry.prompt == PROMPT_TEMPLATE  # what the README tells users to send it
    assert named_models.get(" Reference ") is entry
    assert named_models.folder_argument("reference") == DEFAULT_PATH
    assert named_models.folder_argument("some/dir") == Path("some/dir")
    if (DEFAULT_PATH / "config.json").is_file():
        assert named_models.resolve("reference") == DEFAULT_PATH


def test_unknown_name_lists_the_known_ones_without_the_hub(no_network: list[str]) -> None:
    start = time.perf_counter()
    with pytest.raises(UnknownModelError) as error:
        named_models.resolve("referenc")
    message = str(error.value)
    assert "'referenc': no such folder" in message and "known: reference" in message
    assert no_network == []  # not even the cache: a name without org/ is no hub id
    with pytest.raises(UnknownModelError, match="known: reference"):
        named_models.resolve("./runs/no/such/folder")
    assert time.perf_counter() - start < 1.0


def test_hub_id_offline_says_it_cannot_be_downloaded(no_network: list[str]) -> None:
    with pytest.raises(UnknownModelError) as error:
        named_models.resolve("llava-hf/llava-1.5-7b-hf-typo")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message and "offline" in message
    assert "known: reference" in message
    assert no_network == ["llava-hf/llava-1.5-7b-hf-typo"]


def test_hub_id_is_passed_on_when_cached_or_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(named_models, "_in_hub_cache", lambda repo: False)
    probes: list[int] = []
    monkeypatch.setattr(named_models, "_hub_reachable", lambda: probes.append(1) or True)
    assert named_models.resolve("org/model") == "org/model"
    monkeypatch.setattr(named_models, "_hub_reachable", lambda: probes.append(1) or False)
    with pytest.raises(UnknownModelError, match="cannot be reached"):
        named_models.resolve("org/model")
    monkeypatch.setattr(named_models, "_in_hub_cache", lambda repo: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert named_models.resolve("org/model") == "org/model"  # cached: loads offline
    assert probes == [1, 1]


def test_hub_probe_is_one_quick_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    assert named_models._hub_reachable(timeout_s=2.0) is False
    assert time.perf_counter() - start < 2.5


def test_folders_without_a_model_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="config.json missing"):
        named_models.resolve(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UnknownModelError, match="is a file"):
        named_models.resolve(tmp_path / "weights.bin")


def test_missing_named_model_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = replace(named_models.get("reference"), folder=lambda: tmp_path / "gone")
    monkeypatch.setitem(named_models._REGISTRY, "reference", entry)
    with pytest.raises(UnknownModelError) as error:
        named_models.resolve("reference")
    assert f"has no files at {tmp_path / 'gone'}" in str(error.value)
    assert "make reference-model" in str(error.value)


def test_a_new_entry_with_its_own_loader_is_used_by_every_loader(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `pretrained-mini` will be: one entry, its own folder and loader."""
    from mllm_crossget.serving.engine import default_model_name, load_model

    calls: list[tuple[Path, torch.dtype]] = []

    def loader(folder: Path, dtype: torch.dtype) -> tuple[object, object]:
        calls.append((folder, dtype))
        return named_models.load_llava_folder(folder, dtype)

    monkeypatch.setattr(named_models, "_REGISTRY", dict(named_models._REGISTRY))
    named_models.register(
        NamedModel(
            name="mini-test",
            summary="a test entry",
            prompt="{question}",
            folder=lambda: model_dir,
            missing="build it",
            loader=loader,
        )
    )
    assert "mini-test" in named_models.known_names()
    model, processor = load_model("mini-test", dtype="bf16")
    assert calls == [(model_dir, torch.bfloat16)]
    assert next(model.parameters()).dtype == torch.bfloat16
    assert processor.tokenizer.padding_side == "left"
    assert default_model_name("mini-test") == "mini-test"
    assert default_model_name(str(model_dir)) == model_dir.name
    with pytest.raises(ValueError, match="lower case"):
        named_models.register(replace(named_models.get("mini-test"), name="Mini"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, nested ones included
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_no_library_module_imports_eval_or_recipes() -> None:
    offenders = {
        str(path.relative_to(ROOT)): _imported_roots(path) & {"eval", "recipes"}
        for path in (ROOT / "mllm_crossget").rglob("*.py")
        if _imported_roots(path) & {"eval", "recipes"}
    }
    assert offenders == {}
    # cli.py names harness modules as strings in its verb table only (imported on use)
    assert {module.split(".")[0] for module, _ in cli.VERBS.values()} == {
        "eval",
        "recipes",
        "mllm_crossget",
    }


def test_loading_reference_through_the_library_never_imports_eval() -> None:
    code = (
        "import sys, mllm_crossget, mllm_crossget.serving.engine as e, mllm_crossget.cli\n"
        "from mllm_crossget import named_models\n"
        "f = named_models.get('reference').folder()\n"
        "if (f / 'config.json').is_file(): e.load_model('reference')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('eval', 'recipes')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_trainer_modules_import_one_way() -> None:
    training = ROOT / "eval" / "testbed" / "training"

    def siblings(name: str) -> set[str]:
        tree = ast.parse((training / f"{name}.py").read_text())
        return {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("eval.testbed.training.")
        }

    assert siblings("train") == {"grounding", "pixels", "resume", "vision_pretrain"}
    assert siblings("vision_pretrain") == {"pixels", "resume"}
    assert siblings("grounding") == set() and siblings("pixels") == set()
    assert siblings("resume") == set()
    assert not (ROOT / "recipes" / "train.py").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["visualize", "--model", "referenc"], "crossget visualize: --model 'referenc'"),
        (["chat", "--model", "referenc"], "--model 'referenc': no such folder"),
        (["bench-serve", "--model", "nosuch"], "known: reference"),
    ],
)
def test_verbs_report_a_model_typo_offline(
    argv: list[str], needle: str, no_network: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "org/typo", "--data", "nowhere"],
        ["bench", "--model", "referenc"],
        [
            "finetune",
            "--model",
            "referenc",
            "--data",
            "x",
            "--visual-tokens",
            "8",
            "--output-dir",
            "y",
        ],
    ],
)
def test_model_typo_stops_before_any_work(
    argv: list[str], no_network: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a if a != "y" else str(tmp_path / "ft") for a in argv]
    try:
        code = cli.main(argv)
        message = capsys.readouterr().err
    except SystemExit as stop:
        code, message = stop.code, str(stop.code)
    assert code not in (0, None)
    assert "known: reference" in message


def test_old_train_verb_points_at_the_new_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--help"]) == 2
    err = capsys.readouterr().err
    assert "crossget testbed-train" in err and "crossget finetune" in err
    assert "testbed-train" in cli.VERBS and "train" not in cli.VERBS


def test_folder_verbs_refuse_a_typo_as_a_usage_error(
    no_network: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from eval import recovery_study
    from eval.testbed import evaluate

    for main in (recovery_study.main, evaluate.main):
        with pytest.raises(SystemExit) as stop:
            main(["--model", "referenc"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert (
            "'referenc': no such folder, and not a named model (known: reference, pretrained-mini)"
            in err
        )
    if (named_models.REFERENCE_FOLDER / "config.json").is_file():
        assert named_models.existing_folder_argument("reference") == named_models.REFERENCE_FOLDER
