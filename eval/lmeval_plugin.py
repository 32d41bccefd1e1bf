"""lm-evaluation-harness model ``crossget-llava``: HF multimodal LLaVA with CrossGET applied.

lm-eval finds models through its registry only, so this module must be imported before its
CLI runs: ``crossget lm-eval`` (or ``python -m eval.lmeval_plugin``) does that and then hands
every argument to lm-eval's own CLI::

    crossget lm-eval --model crossget-llava \\
        --model_args pretrained=PATH,visual_tokens=64,guidance=cross \\
        --include_path DATA/lmeval --tasks crossget_testbed --batch_size 8

Budget keys in ``model_args`` are the fields of :class:`mllm_crossget.CrossGETConfig`
(``visual_tokens``, ``keep_ratio``, ``r``, ``guidance``, ``schedule``, ``matching``, ...);
without one the model runs unmodified, which gives the baseline under the same harness.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM

import mllm_crossget as crossget
from mllm_crossget import named_models

CONFIG_KEYS = frozenset(f.name for f in fields(crossget.CrossGETConfig))


@register_model("crossget-llava")
class CrossGETLlavaLM(HFMultimodalLM):
    """``HFMultimodalLM`` whose model and processor go through ``crossget.apply``."""

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in CONFIG_KEYS}
        if isinstance(pretrained, str):  # pretrained=reference, a folder or a hub id
            pretrained = str(named_models.resolve(pretrained))
        super().__init__(pretrained, **kwargs)
        self.crossget_config = None
        if any(options.get(k) is not None for k in ("visual_tokens", "keep_ratio", "r")):
            self.crossget_config = crossget.CrossGETConfig(**options)
            _, self.processor = crossget.apply(self._model, self.crossget_config, self.processor)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with ``crossget-llava`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
