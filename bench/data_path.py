"""Training shards' bytes per row, and the rows/s of preprocessing, the training input and training.

For the mini-LLaVA's processor (224 px) and the same processor at LLaVA-1.5's 336 px (CLIP's
resize + centre crop to 336 and CLIP's mean/std; the tokenizer unchanged, 576 image tokens), on
two image sets: the demo's training mix (Fashion-MNIST + clip-art PNGs from ``--corpora``) and
distinct photo JPEGs the size of an ImageNet photo (500x375 crops of scikit-learn's samples):

- bytes per row of a parquet shard holding the float32 pixels (the format before) and of one
  holding the image file's bytes (now), and their ratio;
- preprocessing rows/s of one encoder on one CPU (what one Ray actor does: decode, validate,
  process, build the row);
- training input rows/s of one ``ImageTensors`` actor on one CPU (decode + processor) plus the
  worker's ``examples_from_table`` + ``collate``;
- with ``--train-steps N`` (default 2), the mini-LLaVA's training step on this CPU (the
  ``mini-llava.yaml`` recipe, one AdamW step, the VLM in float32) at 224 px on the demo mix, so
  the rows/s training consumes per worker, and the input's margin over it. The mini-LLaVA is a
  224-px model: at 336 px only the input side is measured.

Everything runs in this process through the pipelines' own classes (no Ray): rates are per
actor or per worker, and a run multiplies them by ``data.decode_actors`` and ``ray.num_workers``.

    python bench/data_path.py                         # 48 rows a set, 2 timed training steps
    python bench/data_path.py --rows 16 --train-steps 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from autoselect.data import collate, encode_example
from autoselect.training import compute_loss
from mlops.backbone import load_processor, load_vlm
from pipelines.corpora import DEFAULT_OUT, load_records, record_messages
from pipelines.preprocessing.encode import Encoder
from pipelines.preprocessing.samples import chat_messages, decode_image
from pipelines.preprocessing.shards import (
    OK, TOKEN_COLUMNS, ImageTensors, encoded_schema, example_columns, examples_from_table, tensor_type, to_table,
)
from pipelines.training.config import load_train_config

ROOT = Path(__file__).resolve().parent.parent
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
GOAL_RATIO, GOAL_MARGIN = 20, 3  # shards >= 20x smaller at 336 px; the input >= 3x training's rows/s


def sample_row(sample_id: str, data: bytes, messages: list[dict]) -> dict:
    """A row as the corpus readers hand it to the encoder."""
    return {"id": sample_id, "source": "bench", "image": data, "image_path": "", "messages": json.dumps(messages),
            "reason": "", "detail": ""}


def demo_mix(corpora: Path, rows: int) -> list[dict]:
    """Half Fashion-MNIST, half clip-art category questions (the demo's training mix), train split."""
    fmnist = load_records(corpora, "fashion_mnist", "train")[: rows - rows // 2]
    clipart = [r for r in load_records(corpora, "openclipart", "train") if r["task"] == "clipart_category"][: rows // 2]
    return [sample_row(r["id"], (corpora / r["image"]).read_bytes(), record_messages(r)) for r in fmnist + clipart]


def photos(rows: int) -> list[dict]:
    """Distinct ImageNet-sized JPEG files (500x375, quality 90): crops of scikit-learn's two sample
    photos at different offsets (repeating one file would let parquet's dictionary encoding
    store it once and flatter both formats)."""
    import sklearn.datasets
    from PIL import Image

    from pipelines.preprocessing.samples import encode_image

    files = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    messages = chat_messages([("Describe the image in one sentence.", "A photo.")])
    out = []
    for n in range(rows):
        with Image.open(files[n % len(files)]) as photo:
            left, top = (n * 7) % (photo.width - 500), (n * 5) % (photo.height - 375)
            crop = photo.convert("RGB").crop((left, top, left + 500, top + 375))
        out.append(sample_row(f"photo-{n}", encode_image(crop, "JPEG", quality=90), messages))
    return out


def processor_at(model: str, pixels: int, out: Path) -> str:
    """A processor folder: the model's own at its resolution, else resized and cropped to
    ``pixels`` with CLIP's normalisation (LLaVA-1.5's image processor settings)."""
    processor = load_processor(model)
    if processor.image_processor.crop_size["height"] == pixels:
        return model
    processor = copy.deepcopy(processor)
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": pixels}
    image_processor.crop_size = {"height": pixels, "width": pixels}
    image_processor.image_mean, image_processor.image_std = CLIP_MEAN, CLIP_STD
    processor.save_pretrained(out)
    return str(out)


def to_parquet(table: pa.Table) -> pa.Buffer:
    """``table`` as one parquet file, written like the sink writes (default compression)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


def measure(model: str, samples: list[dict], batch_size: int) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Bytes per row both ways, and the preprocessing and training-input rates, on one thread."""
    encoder = Encoder(model, max_length=100_000, image_fs=pafs.LocalFileSystem(), max_image_bytes=8 * 2**20)
    started = time.perf_counter()
    rows = [encoder.encode(sample) for sample in samples]
    preprocess_s = time.perf_counter() - started
    bad = [row for row in rows if row["status"] != OK]
    if bad:
        raise RuntimeError(f"rows the encoder rejected: {bad[:3]}")
    new = to_table(rows, encoder.schema).drop_columns(["status", "detail"])

    old_rows, types = [], {}  # the pixel shards: every tensor stored, as preprocessing wrote before
    for sample in samples:
        example = encode_example(encoder.processor, json.loads(sample["messages"]), [decode_image(sample["image"])])
        types = {name: tensor_type(t) for name, t in example.items() if name not in TOKEN_COLUMNS}
        old_rows.append({**{k: sample[k] for k in ("id", "source")}, "status": OK, "detail": "", **example_columns(example)})
    old = to_table(old_rows, encoded_schema(types)).drop_columns(["status", "detail"])

    stage = ImageTensors(model)
    pad = encoder.processor.tokenizer.pad_token_id or 0
    read_back = pq.read_table(pa.BufferReader(to_parquet(new)))
    examples: list[dict[str, torch.Tensor]] = []
    started = time.perf_counter()
    for offset in range(0, read_back.num_rows, batch_size):
        batch = examples_from_table(stage(read_back.slice(offset, batch_size)))
        collate(batch, pad)
        examples += batch
    input_s = time.perf_counter() - started
    n = len(samples)
    old_bytes, new_bytes = to_parquet(old).size / n, to_parquet(new).size / n
    return {
        "rows": n,
        "pixel_values_shape": list(examples[0]["pixel_values"].shape),
        "old_bytes_per_row": round(old_bytes),
        "new_bytes_per_row": round(new_bytes),
        "mean_image_file_bytes": round(sum(len(s["image"]) for s in samples) / n),
        "smaller_x": round(old_bytes / new_bytes, 1),
        "preprocess_rows_per_s_one_cpu": round(n / preprocess_s, 1),
        "input_rows_per_s_one_cpu": round(n / input_s, 1),
    }, examples


def train_rows_per_s(model: str, examples: list[dict[str, torch.Tensor]], batch_size: int, steps: int, threads: int) -> dict:
    """The mini-LLaVA recipe's training step (forward, backward, AdamW) on a batch of ``examples``."""
    from autoselect import AutoSelectModel

    torch.set_num_threads(threads)
    recipe = load_train_config(ROOT / "pipelines" / "configs" / "mini-llava.yaml")
    torch.manual_seed(0)
    model_ = AutoSelectModel.attach(load_vlm(model, "float32", torch.device("cpu")), recipe.autoselect_config())
    optimizer = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=recipe.optim.lr)
    batch = collate(examples[:batch_size], load_processor(model).tokenizer.pad_token_id)
    seconds = []
    for step in range(steps + 1):  # the first one warms up
        started = time.perf_counter()
        loss, _ = compute_loss(model_, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            seconds.append(time.perf_counter() - started)
    step_s = statistics.median(seconds)
    return {"seconds_per_step": round(step_s, 3), "batch_size": batch_size, "threads": threads,
            "rows_per_s_per_worker": round(batch_size / step_s, 3), "timed_steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the mini-LLaVA folder (default: build_aligned_mini_llava's)")
    parser.add_argument("--corpora", type=Path, default=DEFAULT_OUT, help="exported corpora (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=48, help="rows per image set (default: %(default)s)")
    parser.add_argument("--pixels", default="224,336", help="resolutions (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per worker step, mini-llava.yaml's (default: %(default)s)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps; 0: not measured (default: %(default)s)")
    parser.add_argument("--train-threads", type=int, default=2, help="torch threads of the training step (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.model is None:
        from minillava.aligned import build_aligned_mini_llava

        args.model = str(build_aligned_mini_llava().path)
    torch.set_num_threads(1)  # one actor, one CPU
    sets = {"photos": photos(args.rows)}
    if (args.corpora / "fashion_mnist.train.jsonl").is_file():
        sets["demo"] = demo_mix(args.corpora, args.rows)
    result: dict = {"bench": "data_path", "model": args.model, "sets": {}, "notes": []}
    if "demo" not in sets:
        result["notes"].append(f"no corpora in {args.corpora}: the demo mix was not measured")
    train_examples = None
    with tempfile.TemporaryDirectory() as tmp:
        for pixels in (int(p) for p in args.pixels.split(",")):
            model = processor_at(args.model, pixels, Path(tmp) / f"processor-{pixels}")
            for name, samples in sets.items():
                figures, examples = measure(model, samples, args.batch_size)
                result["sets"][f"{name}@{pixels}"] = {"set": name, "pixels": pixels, **figures}
                if model == args.model and (train_examples is None or name == "demo"):
                    train_examples = examples
    if args.train_steps and train_examples is not None:
        result["training"] = train_rows_per_s(args.model, train_examples, args.batch_size, args.train_steps, args.train_threads)
        consumed = result["training"]["rows_per_s_per_worker"]
        for figures in result["sets"].values():
            figures["input_over_training_x"] = round(figures["input_rows_per_s_one_cpu"] / consumed, 1)
            figures["actors_per_worker_for_3x"] = math.ceil(GOAL_MARGIN * consumed / figures["input_rows_per_s_one_cpu"])
    else:
        result["notes"].append("training step not measured (--train-steps 0): no input/training ratio")
    print(json.dumps(result, indent=2))

    print("\n| set @ px | pixel_values | old bytes/row | new bytes/row | smaller | preprocess rows/s (1 CPU) "
          "| input rows/s (1 CPU) | input / training |")
    print("|---|---|---|---|---|---|---|---|")
    for key, f in result["sets"].items():
        ratio = f"{f['input_over_training_x']}x" if "input_over_training_x" in f else "not measured"
        print(f"| {key} | {f['pixel_values_shape']} | {f['old_bytes_per_row']:,} | {f['new_bytes_per_row']:,} | "
              f"{f['smaller_x']}x | {f['preprocess_rows_per_s_one_cpu']} | {f['input_rows_per_s_one_cpu']} | {ratio} |")
    if "training" in result:
        t = result["training"]
        print(f"\ntraining (mini-LLaVA, 224 px, CPU, {t['threads']} threads): {t['seconds_per_step']} s/step at batch "
              f"{t['batch_size']} = {t['rows_per_s_per_worker']} rows/s per worker")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
