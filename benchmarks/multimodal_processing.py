"""Media processing throughput: s1serve's processor against the reference processors, on the same files.

    .venv/bin/python benchmarks/multimodal_processing.py [--reference-python /tmp/refvenv/bin/python]
        [--reference-dir DIR] [--reference-pythonpath DIR] [--repeats 5]

Inputs are made in a temporary folder: a 1024x1024 JPEG photo-like image and a 30 s 1280x720 clip at 30 fps
(H.264 when PyAV has libx264, else MPEG-4). Each side goes from the file's bytes to prompt ids plus
pixel_values: decode, sample frames (video: 2 fps -> 60 frames), resize, normalise, patch, expand the prompt
and tokenise. s1serve runs `MultimodalProcessor.process`; the reference runs transformers' load_image /
load_video(backend="pyav") and the authors' InternS1ProProcessor (fast image processor, torchvision resize), in a
subprocess of its own Python. The best of --repeats wall times per item counts; both sides use torch's default
threads. Without the reference Python the reference column is empty and a line says why.

The encoder columns then run s1serve's vision tower (what the engine does once per item) on the processed
pixel_values: by default the `make-tiny --preset bench` tower (depth 2, width 256, 4 heads: the published
proportions are far too heavy for CPU), random BF16 weights (time does not depend on their values), one item at
a time; `--encoder-preset tiny` or `none` to change or skip it. The reference's tower is not timed. The reference's
processors need torchvision; tests/fixtures/multimodal_processing/README.md says how the goldens' environment
got one that loads with torch 2.13 (pass its folder as --reference-pythonpath). --reference-dir must hold the authors'
`.py` files and the tokenizer files (copy `s1serve/assets/*` beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from s1serve.assets import ASSETS_DIR  # noqa: E402
from s1serve.multimodal import MediaItem, MultimodalProcessor  # noqa: E402
from s1serve.tokenizer import load_tokenizer  # noqa: E402

IMAGE_TEXT = "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
VIDEO_TEXT = "<|im_start|>user\nVideo 1: <|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"

REFERENCE_SCRIPT = r"""
import json, sys, time, logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from functools import partial
from transformers import AutoProcessor
from transformers.image_utils import load_image
from transformers.video_utils import load_video
args = json.loads(sys.stdin.read())
processor = AutoProcessor.from_pretrained(args["reference_dir"], trust_remote_code=True)
def image():
    return processor(text=[args["image_text"]], images=[load_image(args["image"])], return_tensors="pt")
def video():
    sampler = partial(processor.video_processor.sample_frames, fps=2)
    frames, meta = load_video(args["video"], backend="pyav", sample_indices_fn=sampler)
    return processor(text=[args["video_text"]], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                     return_tensors="pt")
out = {"image_processor": type(processor.image_processor).__name__}
for name, fn in (("image", image), ("video", video)):
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter(); result = fn(); times.append(time.perf_counter() - start)
    out[name] = {"best_s": min(times), "prompt_ids": len(result["input_ids"][0])}
print(json.dumps(out))
"""


def make_image(path: Path) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1024, 0:1024] / 1024.0
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(11 * x * y)], axis=-1) * 100 + 128
    noisy = base + rng.normal(0, 12, base.shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_clip(path: Path, seconds: int = 30, fps: int = 30, width: int = 1280, height: int = 720) -> str:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(seconds * fps):
            frame = np.stack([(x + 5 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
            frame[100 + i % 400 : 200 + i % 400, 50 + 2 * i % 1000 : 250 + 2 * i % 1000] = (255, 255, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_reference(args, image: Path, video: Path) -> dict | str:
    python = Path(args.reference_python)
    if not python.exists():
        return f"reference Python {python} not found"
    if not (Path(args.reference_dir) / "processing_interns1_pro.py").exists():
        return f"reference folder {args.reference_dir} lacks processing_interns1_pro.py"
    env = dict(os.environ)
    if args.reference_pythonpath:
        env["PYTHONPATH"] = args.reference_pythonpath
    payload = {"reference_dir": args.reference_dir, "image": str(image), "video": str(video), "repeats": args.repeats,
               "image_text": IMAGE_TEXT, "video_text": VIDEO_TEXT}
    done = subprocess.run([str(python), "-c", REFERENCE_SCRIPT], input=json.dumps(payload), capture_output=True,
                          text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return "reference failed: " + done.stderr.strip().splitlines()[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def vision_tower(preset: str):
    """A vision tower of a make-tiny preset with random BF16 weights, or None for "none"."""
    if preset == "none":
        return None
    import torch

    from s1serve.checkpoint.tiny import tiny_config
    from s1serve.config import parse_model_config
    from s1serve.models.vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower(parse_model_config(tiny_config(preset), f"{preset} preset").vision)
    with torch.no_grad():
        for param in tower.parameters():
            param.normal_(0, 0.02)
    return tower.to(torch.bfloat16).eval()


def encode(tower, processed) -> None:
    import torch

    with torch.inference_mode():
        for item in processed.items:
            tower(item.pixel_values, torch.tensor([item.grid_thw]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", default="/tmp/refvenv/bin/python")
    parser.add_argument("--reference-dir", default="/tmp/ref/checkpoints/Intern-S1-Pro")
    parser.add_argument("--reference-pythonpath", default="", help="extra import path for the reference (torchvision)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder-preset", default="bench", choices=("bench", "tiny", "none"),
                        help="make-tiny preset whose vision tower is timed on the processed items")
    args = parser.parse_args()
    encoder = vision_tower(args.encoder_preset)

    processor = MultimodalProcessor.from_model_dir(ASSETS_DIR, load_tokenizer(ASSETS_DIR))
    with tempfile.TemporaryDirectory() as folder:
        image_path, video_path = Path(folder) / "image.jpg", Path(folder) / "clip.mp4"
        make_image(image_path)
        codec = make_clip(video_path)
        image = MediaItem.from_bytes("image", image_path.read_bytes())
        video = MediaItem.from_bytes("video", video_path.read_bytes())
        ours = {
            "image": best_of(args.repeats, lambda: processor.process(IMAGE_TEXT, [image])),
            "video": best_of(args.repeats, lambda: processor.process(VIDEO_TEXT, [video])),
        }
        encoded = {name: best_of(args.repeats, lambda r=result: encode(encoder, r)) if encoder else None
                   for name, (_, result) in ours.items()}
        reference = run_reference(args, image_path, video_path)

    print(f"inputs: 1024x1024 JPEG ({len(image.data)} bytes); 30 s 1280x720 30 fps {codec} ({len(video.data)} bytes)")
    print(f"best of {args.repeats}, wall seconds per item, torch threads {__import__('torch').get_num_threads()}")
    print(f"{'input':<28}{'s1serve s':>11}{'items/s':>9}{'reference s':>13}{'items/s':>9}{'ratio':>8}"
          f"{'encoder s':>11}{'proc+enc items/s':>18}  prompt ids")
    for name, label in (("image", "1024x1024 image"), ("video", "30 s 720p clip (60 frames)")):
        seconds, result = ours[name]
        ref = reference.get(name) if isinstance(reference, dict) else None
        ref_cols = f"{ref['best_s']:>13.3f}{1 / ref['best_s']:>9.2f}{ref['best_s'] / seconds:>7.1f}x" if ref else f"{'-':>13}{'-':>9}{'-':>8}"
        enc = encoded[name][0] if encoded[name] else None
        enc_cols = f"{enc:>11.3f}{1 / (seconds + enc):>18.2f}" if enc else f"{'-':>11}{'-':>18}"
        ids = f"{len(result.token_ids)}" + (f" (reference {ref['prompt_ids']})" if ref else "")
        print(f"{label:<28}{seconds:>11.3f}{1 / seconds:>9.2f}{ref_cols}{enc_cols}  {ids}")
    if encoder is not None:
        c = encoder.config
        print(f"encoder: make-tiny --preset {args.encoder_preset} vision tower (depth {c.depth}, width "
              f"{c.hidden_size}, {c.num_heads} heads), bf16, one item per call")
    if isinstance(reference, str):
        print(f"reference not run: {reference}")
    else:
        print(f"reference image processor: {reference['image_processor']}")


if __name__ == "__main__":
    main()
