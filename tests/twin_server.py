"""`transformers serve` (transformers 5.23's OpenAI-compatible server) for a twin, on a machine
without torchvision: the real server, its real processor and chat template, the twin's weights.

    python tests/twin_server.py FOLDER --port N [any other `transformers serve` option]

Why a launcher and not the plain command. Every Qwen VL processor of transformers 5.23 has a
video processor, and those exist only for the torchvision backend
(`models/auto/video_processing_auto.py`: `"qwen2_5_vl": {"torchvision": "Qwen2VLVideoProcessor"}`),
so `AutoProcessor.from_pretrained` fails without torchvision even for images; and this CPU
machine cannot have torchvision (PyPI's wheel for torch 2.13 links libtorch_cuda.so, which the
CPU torch does not have). So this process, and only this process:
  1. registers an images-only video processor for the Qwen VL configs (public
     `AutoVideoProcessor.register`); it refuses videos, which CoRGI never sends;
  2. makes `VideoProcessorMixin` findable where `ProcessorMixin` type-checks its parts (it is
     exported from `transformers` only with torchvision installed);
then runs `transformers serve` unchanged. The served folder gets a `video_preprocessor_config.json`
naming the stand-in (`serve_folder` writes it beside links to the twin's files). With
torchvision installed (a GPU host) plain `transformers serve FOLDER` works and none of this is needed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
STAND_IN = "ImagesOnlyVideoProcessor"


def serve_folder(twin: Path, folder: Path) -> Path:
    """`folder`: links to the twin's files plus the stand-in video processor's config."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in twin.iterdir():
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": STAND_IN}))
    return folder


def main() -> None:
    import transformers.processing_utils as processing_utils
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

    class ImagesOnlyVideoProcessor(BaseVideoProcessor):
        merge_size, patch_size, temporal_patch_size = 2, 14, 2

        def __call__(self, *args, **kwargs):
            raise ValueError("this server takes images, not videos")

    assert ImagesOnlyVideoProcessor.__name__ == STAND_IN
    for model_type in QWEN_VL_TYPES:
        AutoVideoProcessor.register(CONFIG_MAPPING[model_type], ImagesOnlyVideoProcessor, exist_ok=True)
    processing_utils.transformers_module.VideoProcessorMixin = VideoProcessorMixin

    from transformers.cli.transformers import main as transformers_main
    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    transformers_main()


if __name__ == "__main__":
    main()
