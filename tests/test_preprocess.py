"""Preprocessing: the three corpus formats with broken inputs, local and S3, down to a model loss.

Each corpus states the outcome it expects for every sample id, so the checks are exact: the
counts per reason, which ids went to quarantine, and which ids became training rows.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from autoselect.data import collate, encode_example
from autoselect.placeholders import IGNORE_INDEX
from mlops import storage
from pipelines.preprocessing.corpus import RecordSpec, in_subset, sample_from_record
from pipelines.preprocess import PreprocessConfig, main, parse_config, run
from pipelines.preprocessing.samples import CORRUPT_IMAGE, Rejected, decode_image
from pipelines.preprocessing.shards import ImageTensors, examples_from_table


def image_bytes(fmt: str = "JPEG", color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buffer, fmt)
    return buffer.getvalue()


JPEG = image_bytes()
PNG = image_bytes("PNG", "blue")
TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]
NOT_AN_IMAGE = b"plain text pretending to be a jpeg"
LONG_ANSWER = " ".join(["colour"] * 200)
MAX_LENGTH = 160  # a normal sample is ~90 tokens (64 of them image tokens); LONG_ANSWER is far more


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def llava(sample_id: str, image: str, question: str, answer: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": [turn("human", question), turn("gpt", answer)]}


def write_llava_corpus(root: Path) -> dict[str, str]:
    """A LLaVA ``.json`` + ``.jsonl`` + ``images/`` corpus; returns sample id -> expected status."""
    images = root / "images"
    images.mkdir(parents=True)
    files = {"red.jpg": JPEG, "blue.png": PNG, "truncated.jpg": TRUNCATED_JPEG, "text.jpg": NOT_AN_IMAGE}
    for name, data in files.items():
        (images / name).write_bytes(data)
    multi_turn = [turn("human", "What is this?\n<image>"), turn("gpt", "A blue square."),
                  turn("human", "Is it red?"), turn("gpt", "No, it is blue.")]
    records = [
        llava("good-1", "images/red.jpg", "<image>\nWhat colour is it?", "It is red."),
        {"id": "good-multi", "image": "images/blue.png", "conversations": multi_turn},
        llava("truncated", "images/truncated.jpg", "<image>\nWhat is it?", "A square."),
        llava("missing", "images/missing.jpg", "<image>\nWhat is it?", "A square."),
        llava("empty-answer", "images/red.jpg", "<image>\nWhat is it?", "   "),
    ]
    (root / "annotations.json").write_text(json.dumps(records))
    lines = [
        json.dumps(llava("good-2", "images/red.jpg", "<image>\nDescribe it.", "A red square.")),
        json.dumps(llava("not-image", "images/text.jpg", "<image>\nWhat is it?", "A square.")),
        json.dumps(llava("too-long", "images/red.jpg", "<image>\nSay a lot.", LONG_ANSWER)),
        '{"id": "cut-off", "image": "images/red.jpg", "conv',  # 4th record: unparseable line
        json.dumps({"id": "text-only", "conversations": [turn("human", "Hi"), turn("gpt", "Hello")]}),
        json.dumps({"id": "gpt-first", "image": "images/red.jpg",
                    "conversations": [turn("gpt", "A"), turn("human", "Q")]}),
    ]
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "good-1": "ok", "good-multi": "ok", "good-2": "ok",
        "truncated": "corrupt_image", "not-image": "corrupt_image",
        "missing": "missing_image", "text-only": "missing_image",
        "empty-answer": "empty_text", "too-long": "too_long",
        "annotations.jsonl:3": "bad_record", "gpt-first": "bad_record",
    }


def training_examples(rows: list[dict], model: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """What training gets from these shard rows: images decoded and processed, tensors rebuilt."""
    table = ImageTensors(str(model))(pa.Table.from_pylist(rows))
    return dict(zip(table["id"].to_pylist(), examples_from_table(table)))


def check_run(stats: dict, expected: dict[str, str], fs: pafs.FileSystem, output: str) -> list[dict]:
    """Exact counts per reason, the right ids in each table; returns the training rows."""
    want = Counter(expected.values())
    assert stats["rows_in"] == len(expected)
    assert stats["rows_written"] == want.pop("ok")
    assert stats["rows_quarantined"] == sum(want.values())
    assert {reason: n for reason, n in stats["quarantined_by_reason"].items() if n} == dict(want)
    assert stats["rows_in"] == stats["rows_written"] + stats["rows_quarantined"]
    data = pq.read_table(f"{output}/data", filesystem=fs).to_pylist()
    quarantine = pq.read_table(f"{output}/quarantine", filesystem=fs).to_pylist()
    assert sorted(row["id"] for row in data) == sorted(i for i, status in expected.items() if status == "ok")
    assert {row["id"]: row["reason"] for row in quarantine} == {i: s for i, s in expected.items() if s != "ok"}
    assert all(row["detail"] and row["source"] for row in quarantine)
    return data


# --- Ray pipelines --------------------------------------------------------------------------


def test_llava_json_and_jsonl_with_broken_inputs(ray_local, tiny_llava_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    expected = write_llava_corpus(tmp_path / "corpus")
    config = PreprocessConfig(
        input=[str(tmp_path / "corpus" / "annotations.json"), str(tmp_path / "corpus" / "annotations.jsonl")],
        output=str(tmp_path / "out"),
        model=str(tiny_llava_dir),
        max_length=MAX_LENGTH,
    )
    stats = run(config)
    data = check_run(stats, expected, pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_in"] == len(expected)

    # The stored tensors are exactly what the processor gives for the same conversation.
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    # Shards keep the source files' bytes; training rebuilds exactly what the processor gives.
    assert {row["id"]: (row["image"], row["image_encoding"]) for row in data} == {
        "good-1": (JPEG, "source"), "good-2": (JPEG, "source"), "good-multi": (PNG, "source")}
    assert stats["images_stored"] == {"source": 3, "png": 0, "jpeg": 0}
    examples = training_examples(data, tiny_llava_dir)
    multi = examples["good-multi"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No, it is blue."}]},
    ]
    direct = encode_example(processor, messages, [Image.open(io.BytesIO(PNG)).convert("RGB")])
    assert multi.keys() == direct.keys()
    for name in direct:
        assert multi[name].dtype == direct[name].dtype and torch.equal(multi[name], direct[name]), name
    answers = processor.tokenizer.decode(multi["input_ids"][multi["labels"] != IGNORE_INDEX])
    assert "A blue square." in answers and "No, it is blue." in answers and "Is it red?" not in answers

    # ... and the tiny LLaVA trains on a collated batch of them.
    vlm = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    batch = collate(list(examples.values()), pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.isfinite(vlm(**batch).loss)


def test_parquet_with_custom_columns_through_the_cli(ray_local, tiny_llava_dir, tmp_path, capsys):
    rows = [
        {"uid": "good-jpeg", "img": JPEG, "prompt": "What colour is it?", "response": "Red."},
        {"uid": "good-png", "img": PNG, "prompt": "What colour is it?", "response": "Blue."},
        {"uid": "not-image", "img": NOT_AN_IMAGE, "prompt": "What is it?", "response": "A square."},
        {"uid": "no-image", "img": None, "prompt": "What is it?", "response": "A square."},
        {"uid": "empty-answer", "img": JPEG, "prompt": "What is it?", "response": ""},
        {"uid": "blank-question", "img": JPEG, "prompt": "  ", "response": "Red."},
        {"uid": "too-long", "img": JPEG, "prompt": "Say a lot.", "response": LONG_ANSWER},
    ]
    schema = pa.schema([("uid", pa.string()), ("img", pa.binary()), ("prompt", pa.string()), ("response", pa.string())])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=schema), corpus / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:], schema=schema), corpus / "part-1.parquet")

    argv = ["--input", str(corpus), "--format", "parquet", "--model", str(tiny_llava_dir),
            "--output", str(tmp_path / "out"), "--max-length", str(MAX_LENGTH),
            "--field", "id=uid", "--field", "image=img", "--field", "question=prompt", "--field", "answer=response"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    expected = {"good-jpeg": "ok", "good-png": "ok", "not-image": "corrupt_image", "no-image": "missing_image",
                "empty-answer": "empty_text", "blank-question": "empty_text", "too-long": "too_long"}
    data = check_run(stats, expected, pafs.LocalFileSystem(), str(tmp_path / "out"))
    for example in training_examples(data, tiny_llava_dir).values():
        assert example["pixel_values"].shape == (1, 3, 32, 32) and len(example["input_ids"]) <= MAX_LENGTH
        assert (example["labels"] != IGNORE_INDEX).any()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_captions_and_json(ray_local, tiny_llava_dir, tmp_path):
    conversation = {"conversations": [turn("human", "<image>\nShape?"), turn("gpt", "A square.")]}
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-000000.tar", [
        ("000.jpg", JPEG), ("000.txt", b"a red square"),
        ("001.png", PNG), ("001.json", json.dumps({"question": "What colour?", "answer": "Blue."}).encode()),
        ("002.jpg", TRUNCATED_JPEG), ("002.txt", b"a broken picture"),
        ("003.txt", b"a caption whose image is missing"),
    ])
    write_shard(shards / "shard-000001.tar", [
        ("004.jpg", JPEG), ("004.txt", b""),
        ("005.jpg", JPEG), ("005.json", b"{not json"),
        ("006.jpg", JPEG), ("006.json", json.dumps(conversation).encode()),
    ])
    config = PreprocessConfig(
        input=[str(shards)], format="webdataset", output=str(tmp_path / "out"), model=str(tiny_llava_dir),
        max_length=MAX_LENGTH, caption_prompt="Caption this picture.",
    )
    expected = {"000": "ok", "001": "ok", "006": "ok", "002": "corrupt_image", "003": "missing_image",
                "004": "empty_text", "005": "bad_record"}
    data = check_run(run(config), expected, pafs.LocalFileSystem(), str(tmp_path / "out"))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    caption = training_examples(data, tiny_llava_dir)["000"]
    assert "Caption this picture." in tokenizer.decode(caption["input_ids"])
    assert "a red square" in tokenizer.decode(caption["input_ids"][caption["labels"] != IGNORE_INDEX])


def test_llava_from_s3_to_s3(ray_local, moto_s3, tiny_llava_dir, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, moto_s3.env[name])  # the endpoint comes from the config instead
    moto_s3.client.create_bucket(Bucket="corpora")
    expected = write_llava_corpus(tmp_path / "corpus")
    for path in (tmp_path / "corpus").rglob("*"):
        if path.is_file():
            key = "llava/" + path.relative_to(tmp_path / "corpus").as_posix()
            moto_s3.client.put_object(Bucket="corpora", Key=key, Body=path.read_bytes())

    config = PreprocessConfig(
        input=["s3://corpora/llava/annotations.json", "s3://corpora/llava/annotations.jsonl"],
        output="s3://corpora/preprocessed", model=str(tiny_llava_dir), max_length=MAX_LENGTH,
        s3_endpoint=moto_s3.endpoint_url,
    )
    stats = run(config)
    assert stats["data"] == "s3://corpora/preprocessed/data"
    assert stats["quarantine"] == "s3://corpora/preprocessed/quarantine"
    data = check_run(stats, expected, storage.s3_filesystem(moto_s3.endpoint_url), "corpora/preprocessed")
    assert all(row["source"].startswith("s3://corpora/llava/annotations.json") for row in data)
    keys = [o["Key"] for o in moto_s3.client.list_objects_v2(Bucket="corpora", Prefix="preprocessed/")["Contents"]]
    assert "preprocessed/stats.json" in keys
    assert all(e["pixel_values"].shape == (1, 3, 32, 32) for e in training_examples(data, tiny_llava_dir).values())


ROOT = Path(__file__).resolve().parent.parent
PAPER_DATA = {  # preprocess config -> the training config that reads its output
    "imagenet-vl-enriched-llava-1.5-7b.yaml": "llava-1.5-7b.yaml",
    "imagenet-vl-enriched-qwen2.5-vl-7b.yaml": "qwen2.5-vl-7b.yaml",
}
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in parquet


def test_paper_data_from_hf_parquet_on_s3_through_the_shipped_config(
    ray_local, moto_s3, tiny_llava_dir, tmp_path, monkeypatch, capsys
):
    """ImageNet-1K-VL-Enriched's layout (HF Image struct, ``caption_enriched``, extra columns) on S3,
    preprocessed with the shipped config's column mapping and caption prompt."""
    from transformers import AutoTokenizer

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, moto_s3.env[name])
    moto_s3.client.create_bucket(Bucket="datasets")
    rows = [  # image_id, image struct, label, caption_enriched, caption (another column, not the mapped one)
        ("n01440764_1", {"bytes": JPEG, "path": "n01440764_1.JPEG"}, 0, "a red square on a table"),
        ("n01443537_2", {"bytes": PNG, "path": "n01443537_2.png"}, 1, "a blue tile"),
        ("n01484850_3", {"bytes": None, "path": "images/n01484850_3.png"}, 2, "a blue tile read from a file"),
        ("n01491361_4", {"bytes": NOT_AN_IMAGE, "path": "n01491361_4.JPEG"}, 3, "a broken picture"),
        ("n01494475_5", {"bytes": TRUNCATED_JPEG, "path": "n01494475_5.JPEG"}, 4, "a cut-off picture"),
        ("n01496331_6", {"bytes": JPEG, "path": "n01496331_6.JPEG"}, 5, None),
        ("n01498041_7", {"bytes": None, "path": None}, 6, "no picture at all"),
    ]
    schema = pa.schema([("image_id", pa.string()), ("image", HF_IMAGE), ("label", pa.int64()),
                        ("caption_enriched", pa.string()), ("caption", pa.string())])
    table = pa.Table.from_pylist(
        [{"image_id": i, "image": im, "label": label, "caption_enriched": c, "caption": "not this one"}
         for i, im, label, c in rows], schema=schema)
    for n, part in enumerate((table.slice(0, 4), table.slice(4))):
        buffer = pa.BufferOutputStream()
        pq.write_table(part, buffer)
        moto_s3.client.put_object(Bucket="datasets", Key=f"imagenet/train/train-{n:05d}-of-00002.parquet",
                                  Body=buffer.getvalue().to_pybytes())
    moto_s3.client.put_object(Bucket="datasets", Key="imagenet/train/images/n01484850_3.png", Body=PNG)

    config_path = ROOT / "pipelines" / "configs" / "preprocess" / "imagenet-vl-enriched-llava-1.5-7b.yaml"
    shipped = parse_config(["--config", str(config_path)])
    assert main(["--config", str(config_path), "--input", "s3://datasets/imagenet/train/",
                 "--output", "s3://datasets/preprocessed", "--model", str(tiny_llava_dir),
                 "--max-length", str(MAX_LENGTH), "--s3-endpoint", moto_s3.endpoint_url, "--concurrency", "1",
                 "--fraction", "1"]) == 0  # all 7 rows: the shipped 10 % is tested on its own
    stats = json.loads(capsys.readouterr().out)
    expected = {"n01440764_1": "ok", "n01443537_2": "ok", "n01484850_3": "ok",
                "n01491361_4": "corrupt_image", "n01494475_5": "corrupt_image",
                "n01496331_6": "empty_text", "n01498041_7": "missing_image"}
    fs = storage.s3_filesystem(moto_s3.endpoint_url)
    data = check_run(stats, expected, fs, "datasets/preprocessed")
    written = json.loads(storage.read_bytes(fs, "datasets/preprocessed/stats.json"))
    assert (written["format"], written["config"]["fields"]) == ("parquet", shipped.fields)
    assert written["config"]["caption_prompt"] == shipped.caption_prompt
    quarantine = {row["id"]: row for row in pq.read_table("datasets/preprocessed/quarantine", filesystem=fs).to_pylist()}
    assert "'caption_enriched' is null" in quarantine["n01496331_6"]["detail"]
    assert quarantine["n01491361_4"]["source"] == "s3://datasets/imagenet/train/train-00000-of-00002.parquet"

    # Every training row asks the config's fixed prompt and learns exactly its caption.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    captions = {i: c for i, _, _, c in rows}
    examples = training_examples(data, tiny_llava_dir)
    for row in data:
        example = examples[row["id"]]
        target = example["labels"] != IGNORE_INDEX
        prompt = tokenizer.decode(example["input_ids"][~target], skip_special_tokens=True)
        assert shipped.caption_prompt in prompt and captions[row["id"]] not in prompt
        assert tokenizer.decode(example["input_ids"][target], skip_special_tokens=True).strip() == captions[row["id"]]
        assert example["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(PAPER_DATA))
def test_paper_data_configs_feed_their_training_configs(name):
    """The shipped preprocess configs validate, map ImageNet-1K-VL-Enriched's columns, and the
    7B training configs read exactly their outputs with the same backbone."""
    import yaml

    config = parse_config(["--config", str(ROOT / "pipelines" / "configs" / "preprocess" / name)])
    assert (config.format, config.fields) == ("parquet", {"id": "image_id", "image": "image", "caption": "caption_enriched"})
    assert config.caption_prompt and all(uri.startswith("s3://") for uri in [*config.input, config.output])
    assert config.fraction == 0.1  # the paper's 10 % of the train split
    train = yaml.safe_load((ROOT / "pipelines" / "configs" / PAPER_DATA[name]).read_text())
    assert train["data"]["train"] == config.output + "/data"
    assert train["model"]["path"] == config.model
    others = [parse_config(["--config", str(ROOT / "pipelines" / "configs" / "preprocess" / n)]) for n in PAPER_DATA]
    assert len({(c.caption_prompt, c.fraction, tuple(c.input), tuple(c.fields.items())) for c in others}) == 1


def test_fraction_keeps_the_samples_whose_id_hashes_into_it(ray_local, tiny_llava_dir, tmp_path):
    """``fraction`` picks samples by id, not position: the same ids whatever the file order, and
    rows_in counts only those (so the every-row-accounted-for check still holds)."""
    ids = [f"n{n:08d}_{n}" for n in range(40)]
    kept = {i for i in ids if in_subset(i, 0.3)}
    assert 0 < len(kept) < len(ids)
    rows = [{"image_id": i, "image": {"bytes": JPEG if n % 5 else NOT_AN_IMAGE, "path": None},
             "caption_enriched": f"picture {n}"} for n, i in enumerate(ids)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    schema = pa.schema([("image_id", pa.string()), ("image", HF_IMAGE), ("caption_enriched", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows[::-1], schema=schema), corpus / "train-00000-of-00001.parquet")
    config = PreprocessConfig(input=[str(corpus)], output=str(tmp_path / "out"), model=str(tiny_llava_dir),
                              format="parquet", max_length=MAX_LENGTH, fraction=0.3,
                              fields={"id": "image_id", "caption": "caption_enriched"})
    expected = {i: "corrupt_image" if n % 5 == 0 else "ok" for n, i in enumerate(ids) if i in kept}
    stats = run(config)
    data = check_run(stats, expected, pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert stats["fraction"] == 0.3 and stats["rows_in"] == len(kept) and len(data) == len(kept) - len(kept & set(ids[::5]))


def test_tasks_keep_only_those_records_and_every_rejected_one(ray_local, tiny_llava_dir, tmp_path):
    """``tasks`` selects records by their task field (the scenes export holds a garment question and
    a caption per image); a broken line has no task and is still quarantined and counted."""
    images = tmp_path / "corpus" / "images"
    images.mkdir(parents=True)
    (images / "red.jpg").write_bytes(JPEG)
    records = [{**llava(f"{n}-{task}", "images/red.jpg", "<image>\nWhat is it?", "A red square."), "task": task}
               for n in range(3) for task in ("scenes_caption", "scenes_garment")]
    records.append(llava("no-task", "images/red.jpg", "<image>\nWhat is it?", "A red square."))
    lines = [json.dumps(record) for record in records] + ['{"id": "cut-off", "task": "scenes_cap']
    (tmp_path / "corpus" / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--input", str(tmp_path / "corpus" / "scenes.jsonl"), "--output", str(tmp_path / "out"),
            "--model", str(tiny_llava_dir), "--max-length", str(MAX_LENGTH), "--tasks", "scenes_caption"]
    assert main(argv) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    expected = {f"{n}-scenes_caption": "ok" for n in range(3)} | {"scenes.jsonl:7": "bad_record"}
    check_run(stats, expected, pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert stats["tasks"] == ["scenes_caption"]
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError, match="tasks"):
            PreprocessConfig(input=["a.json"], output="o", model="m", tasks=bad)


def planned_footer_readers(dataset) -> int:
    """The footer-reader pool Ray Data's planned parquet read will start (its ListFiles operator's
    indexer): a guard that the pinned Ray still takes the number from the environment at plan time."""
    (listing,) = dataset._logical_plan.dag.input_dependencies
    return listing.file_indexer._num_actors


def test_parquet_reads_start_one_footer_reader_unless_the_environment_says_otherwise(ray_local, tmp_path, monkeypatch):
    from pipelines.preprocessing.parquet_reads import FOOTER_READERS_ENV, read_parquet

    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "part-0.parquet")
    monkeypatch.delenv(FOOTER_READERS_ENV, raising=False)
    dataset = read_parquet(str(tmp_path))
    assert planned_footer_readers(dataset) == 1 and FOOTER_READERS_ENV not in os.environ  # set around the call only
    assert planned_footer_readers(ray_local.data.read_parquet(str(tmp_path))) == 32  # other reads keep Ray's default
    monkeypatch.setenv(FOOTER_READERS_ENV, "8")  # a user's own setting (a read of many thousands of files) wins
    assert planned_footer_readers(read_parquet(str(tmp_path))) == 8 and os.environ[FOOTER_READERS_ENV] == "8"


def test_in_subset_is_a_stable_nested_share_of_ids():
    ids = [f"n{n:08d}_{n}" for n in range(20000)]
    tenth, fifth = ({i for i in ids if in_subset(i, f)} for f in (0.1, 0.2))
    assert tenth < fifth and abs(len(tenth) / len(ids) - 0.1) < 0.01 and abs(len(fifth) / len(ids) - 0.2) < 0.01
    assert all(in_subset(i, 1.0) for i in ids[:10]) and tenth == {i for i in reversed(ids) if in_subset(i, 0.1)}
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="fraction"):
            PreprocessConfig(input=["a.json"], output="o", model="m", fraction=bad)


# --- pieces without Ray ---------------------------------------------------------------------


def test_llava_record_becomes_hf_chat_messages():
    record = llava("a", "img/x.jpg", "What is it?\n<image>", "A cat.")
    sample = sample_from_record(record, "ann.json", RecordSpec(), "/data", fallback_id="unused")
    assert (sample["id"], sample["image_path"], sample["image"], sample["reason"]) == ("a", "/data/img/x.jpg", b"", "")
    assert json.loads(sample["messages"]) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]


def test_caption_record_with_hf_image_struct_uses_the_caption_prompt():
    spec = RecordSpec(image="jpg", caption="txt", caption_prompt="Describe.")
    record = {"jpg": {"bytes": JPEG, "path": None}, "txt": "a red square"}
    sample = sample_from_record(record, "x.parquet", spec, "/data", fallback_id="row-0")
    assert (sample["id"], sample["image"], sample["reason"]) == ("row-0", JPEG, "")
    messages = json.loads(sample["messages"])
    assert messages[0]["content"][1]["text"] == "Describe." and messages[1]["content"][0]["text"] == "a red square"


@pytest.mark.parametrize(
    "image, inline, path",
    [
        ({"bytes": JPEG, "path": "n01440764_1.JPEG"}, JPEG, ""),  # bytes win over the path
        ({"bytes": None, "path": "train/n01440764_1.JPEG"}, b"", "/data/train/n01440764_1.JPEG"),
        ({"bytes": b"", "path": "s3://bucket/n01440764_1.JPEG"}, b"", "bucket/n01440764_1.JPEG"),
        (PNG, PNG, ""),
    ],
)
def test_hf_image_struct_bytes_win_and_a_path_only_struct_resolves_like_a_path(image, inline, path):
    record = {"image": image, "caption_enriched": "a fish", "label": 0}
    sample = sample_from_record(record, "x.parquet", RecordSpec(caption="caption_enriched"), "/data", "row-0")
    assert (sample["image"], sample["image_path"], sample["reason"]) == (inline, path, "")


@pytest.mark.parametrize(
    "record, reason, detail",
    [
        ({"image": {"bytes": None, "path": None}, "caption_enriched": "a fish"}, "missing_image", "names no image"),
        ({"image": {"bytes": JPEG, "path": None}, "caption_enriched": None}, "empty_text", "'caption_enriched' is null"),
        ({"image": {"bytes": JPEG, "path": None}, "caption_enriched": float("nan")}, "empty_text", "is null"),
        ({"image": {"bytes": JPEG, "path": None}, "label": 3}, "bad_record", "'caption_enriched' field"),
    ],
)
def test_hf_rows_without_an_image_or_a_caption_get_a_named_reason(record, reason, detail):
    sample = sample_from_record(record, "x.parquet", RecordSpec(caption="caption_enriched"), "/data", "row-0")
    assert sample["reason"] == reason and detail in sample["detail"]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"image": "x.jpg", "conversations": [turn("human", "Q")]}, "bad_record"),
        ({"image": "x.jpg", "conversations": [turn("human", "<image> <image> Q"), turn("gpt", "A")]}, "bad_record"),
        ({"image": "x.jpg"}, "bad_record"),
        ({"question": "Q", "answer": "A"}, "missing_image"),
    ],
)
def test_malformed_records_get_a_reason_not_an_exception(record, reason):
    assert sample_from_record(record, "s", RecordSpec(), "/data", fallback_id="f")["reason"] == reason


def test_decode_image_rejects_truncated_and_non_image_bytes():
    assert decode_image(PNG).mode == "RGB"
    for data in (TRUNCATED_JPEG, NOT_AN_IMAGE):
        with pytest.raises(Rejected) as info:
            decode_image(data)
        assert info.value.reason == CORRUPT_IMAGE


def test_cli_config_yaml_flags_and_errors(tmp_path, capsys):
    config_file = tmp_path / "pre.yaml"
    config_file.write_text("input: a.json\noutput: out\nmodel: m\nmax_length: 512\nfields: {question: q}\n")
    config = parse_config(["--config", str(config_file), "--max-length", "64", "--field", "answer=a"])
    assert (config.input, config.max_length, config.fields) == (["a.json"], 64, {"question": "q", "answer": "a"})

    config_file.write_text("input: a.json\noutput: out\nmodel: m\nmax_lenght: 512\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(config_file)])
    assert "unknown key(s) ['max_lenght']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--input", "a.json", "--output", "o", "--model", "m", "--field", "colour=c"])
    assert "unknown field name(s) ['colour']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"])
    assert info.value.code == 0 and "--s3-endpoint" in capsys.readouterr().out


def test_output_folder_is_never_mixed_with_an_old_run(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        storage.prepare_output(fs, path, overwrite=False)
    storage.prepare_output(fs, path, overwrite=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_s3_endpoint_and_keys_come_from_the_environment(moto_s3, monkeypatch):
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    moto_s3.client.create_bucket(Bucket="env-check")
    moto_s3.client.put_object(Bucket="env-check", Key="a.txt", Body=b"hello")
    fs, path = storage.resolve("s3://env-check/a.txt")
    assert path == "env-check/a.txt" and storage.read_bytes(fs, path) == b"hello"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(fs, "env-check/missing.jpg")  # the encoder relies on this for missing_image
