"""Format readers: LLaVA JSON/JSONL, parquet and WebDataset shards, all to one sample schema.

Each reader yields one row per sample with the same columns, so validation and encoding do not
care where a sample came from:

    id, source       the sample's id and the file (URI) it came from
    image            inline image bytes, or b"" when the image is a file to fetch
    image_path       that file, as a path on the image filesystem ("" when inline)
    messages         HF chat messages as a JSON string (a string so every block has one type)
    reason, detail   "" for a readable record; otherwise why it goes to quarantine

Nothing is dropped here: unparseable lines and malformed records become rows with a reason.
Images are fetched and decoded later, in the encoder, so reading stays cheap enough to count.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

import pyarrow.fs as pafs
import ray.data

from mlops import storage
from pipelines.preprocessing.parquet_reads import read_parquet
from pipelines.preprocessing.samples import BAD_RECORD, EMPTY_TEXT, MISSING_IMAGE, Rejected, chat_messages

FORMATS = ("llava", "parquet", "webdataset")
SUFFIX_FORMATS = {".json": "llava", ".jsonl": "llava", ".parquet": "parquet", ".tar": "webdataset"}
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class RecordSpec:
    """Where a record keeps its parts: JSON keys, parquet columns or WebDataset .json keys."""

    id: str = "id"
    image: str = "image"
    conversations: str = "conversations"  # LLaVA [{"from": "human"|"gpt", "value": ...}, ...]
    question: str = "question"
    answer: str = "answer"
    caption: str = "caption"  # used when there is no conversation and no question/answer
    task: str = "task"  # optional; what ``tasks`` in the preprocess config selects on
    caption_prompt: str = "Write a short caption for the image."

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "caption_prompt"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, str], caption_prompt: str | None = None) -> "RecordSpec":
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown field name(s) {sorted(unknown)}; valid: {sorted(cls.field_names())}")
        extra = {"caption_prompt": caption_prompt} if caption_prompt is not None else {}
        return cls(**values, **extra)


@dataclass
class Corpus:
    """``samples`` to encode, ``records`` (one row per sample, cheap) to count, and where images live."""

    samples: ray.data.Dataset
    records: ray.data.Dataset
    image_fs: pafs.FileSystem

    def subset(self, fraction: float) -> "Corpus":
        """Only the samples whose id hashes into ``fraction`` (see :func:`in_subset`). Counting them
        then reads every record once (its bytes, no image is decoded): ids are only known per record."""
        if fraction >= 1:
            return self
        return self._where(keep_sample, fraction=fraction)

    def only_tasks(self, tasks: Sequence[str] | None) -> "Corpus":
        """Only the samples of ``tasks`` (e.g. the captions of a corpus that also has questions), and
        every record already rejected, so a broken line is still quarantined and counted."""
        if not tasks:
            return self
        return self._where(keep_task, tasks=frozenset(tasks))

    def _where(self, predicate, **kwargs) -> "Corpus":
        """The samples ``predicate`` keeps; they are then also what ``records`` counts."""
        samples = self.samples.filter(predicate, fn_kwargs=kwargs)
        return Corpus(samples=samples, records=samples, image_fs=self.image_fs)


def in_subset(sample_id: str, fraction: float) -> bool:
    """Whether a sample is in the ``fraction`` subset: a hash of its id, not its position, so every
    run and every backbone keeps the same samples whatever the file order (and the ImageNet classes
    alike), and the subset for a smaller fraction lies inside the one for a larger fraction."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def keep_sample(row: Mapping[str, Any], fraction: float) -> bool:
    return in_subset(row["id"], fraction)


def keep_task(row: Mapping[str, Any], tasks: frozenset[str]) -> bool:
    return bool(row["reason"]) or row["task"] in tasks


def infer_format(uri: str) -> str:
    for suffix, fmt in SUFFIX_FORMATS.items():
        if uri.rstrip("/").endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {uri!r} from its name; pass --format {'|'.join(FORMATS)}")


def read_corpus(
    fmt: str,
    inputs: list[str],
    spec: RecordSpec,
    image_root: str | None = None,
    s3_endpoint: str | None = None,
) -> Corpus:
    """Lazy Ray datasets for ``inputs`` (files or folders, local or ``s3://``, one scheme)."""
    if len({storage.is_s3(uri) for uri in inputs}) != 1:
        raise ValueError("inputs must be all local or all s3://")
    resolved = [storage.resolve(uri, s3_endpoint) for uri in inputs]
    fs, paths = resolved[0][0], [path for _, path in resolved]
    scheme = storage.S3_PREFIX if storage.is_s3(inputs[0]) else ""
    image_fs, root = storage.resolve(image_root, s3_endpoint) if image_root else (fs, None)
    kwargs = {"spec": spec, "image_root": root, "scheme": scheme}
    if fmt == "llava":
        files = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, file_extensions=["json", "jsonl"])
        samples = files.flat_map(llava_file_samples, fn_kwargs=kwargs)
        return Corpus(samples=samples, records=samples, image_fs=image_fs)
    if fmt == "parquet":
        raw = read_parquet(paths, filesystem=fs, include_paths=True)
        return Corpus(samples=raw.map(parquet_sample, fn_kwargs=kwargs), records=raw, image_fs=image_fs)
    if fmt == "webdataset":
        raw = ray.data.read_webdataset(paths, filesystem=fs, decoder=None)
        return Corpus(samples=raw.map(webdataset_sample, fn_kwargs=kwargs), records=raw, image_fs=image_fs)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# --- one record -> one sample --------------------------------------------------------------


def sample_from_record(
    record: Mapping[str, Any], source: str, spec: RecordSpec, image_root: str, fallback_id: str
) -> dict:
    """The sample row for one record; problems found here become ``reason``/``detail``."""
    record_id = record.get(spec.id)
    sample = _empty_sample(str(record_id) if _present(record_id) else fallback_id, source)
    task = record.get(spec.task)
    sample["task"] = str(task) if _present(task) else ""
    try:
        sample["messages"] = json.dumps(chat_messages(record_turns(record, spec)))
        image = image_reference(record.get(spec.image), image_root)
    except Rejected as rejected:
        sample.update(reason=rejected.reason, detail=rejected.detail)
        return sample
    sample["image" if isinstance(image, bytes) else "image_path"] = image
    return sample


def record_turns(record: Mapping[str, Any], spec: RecordSpec) -> list[tuple[str, str]]:
    """``(question, answer)`` turns from a conversation, a question/answer pair or a caption."""
    conversation = record.get(spec.conversations)
    if _present(conversation):
        return conversation_turns(conversation)
    question, answer = record.get(spec.question), record.get(spec.answer)
    if _present(question) or _present(answer):
        return [(_text(question), _text(answer))]
    caption = record.get(spec.caption)
    if _present(caption):
        return [(spec.caption_prompt, _text(caption))]
    if spec.caption in record:  # a caption column whose value is null (parquet rows have every column)
        raise Rejected(EMPTY_TEXT, f"the caption {spec.caption!r} is null")
    raise Rejected(
        BAD_RECORD,
        f"no {spec.conversations!r}, {spec.question!r}/{spec.answer!r} or {spec.caption!r} field",
    )


def conversation_turns(conversation: Any) -> list[tuple[str, str]]:
    """Pair LLaVA ``human``/``gpt`` messages; the ``<image>`` marker is dropped from the text."""
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError as exc:
            raise Rejected(BAD_RECORD, f"conversation is not JSON: {exc}") from None
    try:
        messages = [(_role(m.get("from", m.get("role"))), m.get("value", m.get("content"))) for m in conversation]
    except (AttributeError, TypeError):
        raise Rejected(BAD_RECORD, "conversation is not a list of {from, value} objects") from None
    roles = [role for role, _ in messages]
    if not messages or len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
        raise Rejected(BAD_RECORD, f"conversation roles {roles} do not alternate human/gpt")
    texts = [_text(value) for _, value in messages]
    if sum(text.count(IMAGE_TOKEN) for text in texts) > 1:
        raise Rejected(BAD_RECORD, "more than one <image>; one image per sample is supported")
    texts = [text.replace(IMAGE_TOKEN, "").strip() for text in texts]
    return list(zip(texts[0::2], texts[1::2]))


def image_reference(value: Any, image_root: str) -> bytes | str:
    """Inline bytes, or a path on the image filesystem for a file name (relative to ``image_root``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, Mapping):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value.strip():
        name = value.strip()
        if storage.is_s3(name):
            return name[len(storage.S3_PREFIX):]
        return name if name.startswith("/") else posixpath.join(image_root, name)
    if isinstance(value, (list, tuple)) and len(value) > 1:
        raise Rejected(BAD_RECORD, f"{len(value)} images; one image per sample is supported")
    raise Rejected(MISSING_IMAGE, "the record names no image")


# --- per-format row functions (run inside Ray tasks) ----------------------------------------


def llava_file_samples(row: dict, spec: RecordSpec, image_root: str | None, scheme: str) -> Iterator[dict]:
    """Every record of one LLaVA ``.json`` (a list) or ``.jsonl`` file; bad lines are kept as rows."""
    source = scheme + row["path"]
    name = posixpath.basename(row["path"])
    root = image_root or posixpath.dirname(row["path"])
    try:
        text = row["bytes"].decode("utf-8")
        records = _json_records(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        yield _bad_record(name, source, f"{type(exc).__name__}: {exc}")
        return
    for n, record in enumerate(records):
        fallback_id = f"{name}:{n}"
        if isinstance(record, Rejected):
            yield _bad_record(fallback_id, source, record.detail)
        elif not isinstance(record, dict):
            yield _bad_record(fallback_id, source, f"record is a {type(record).__name__}, not an object")
        else:
            yield sample_from_record(record, source, spec, root, fallback_id)


def parquet_sample(row: dict, spec: RecordSpec, image_root: str | None, scheme: str) -> dict:
    """One parquet row (``path`` comes from ``include_paths``); ids default to a content hash."""
    path = row.pop("path")
    fallback_id = "" if _present(row.get(spec.id)) else _content_id(row)
    return sample_from_record(row, scheme + path, spec, image_root or posixpath.dirname(path), fallback_id)


def webdataset_sample(row: dict, spec: RecordSpec, image_root: str | None, scheme: str) -> dict:
    """One WebDataset sample: ``<key>.jpg|png`` plus ``<key>.json`` (a record) or ``<key>.txt`` (a caption)."""
    key, url = row["__key__"], row["__url__"]
    parts = {name.rsplit(".", 1)[-1].lower(): value for name, value in row.items() if isinstance(value, bytes)}
    image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
    record: dict[str, Any] = {}
    try:
        if "json" in parts:
            record = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"{key}.json holds a {type(record).__name__}, not an object")
        elif "txt" in parts:
            record = {spec.caption: parts["txt"].decode("utf-8")}
    except (UnicodeDecodeError, ValueError) as exc:
        return _bad_record(key, scheme + url, f"{type(exc).__name__}: {exc}")
    record = {**record, spec.id: key}
    if image is not None:  # a tar member wins over an image named in the .json
        record[spec.image] = image
    return sample_from_record(record, scheme + url, spec, image_root or posixpath.dirname(url), fallback_id=key)


# --- helpers -------------------------------------------------------------------------------


def _json_records(text: str) -> list[Any]:
    """A JSON array file, or JSON lines where an unparseable line becomes a :class:`Rejected`."""
    if text.lstrip().startswith("["):
        return json.loads(text)
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(Rejected(BAD_RECORD, f"line {lineno}: {exc}"))
    return records


def _empty_sample(sample_id: str, source: str) -> dict:
    return {
        "id": sample_id, "source": source, "task": "", "image": b"", "image_path": "", "messages": "[]", "reason": "",
        "detail": "",
    }


def _bad_record(sample_id: str, source: str, detail: str) -> dict:
    return {**_empty_sample(sample_id, source), "reason": BAD_RECORD, "detail": detail}


def _content_id(row: Mapping[str, Any]) -> str:
    """A stable id for rows that have none: a hash of every value."""
    digest = hashlib.sha1()
    for key in sorted(row):
        value = row[key]
        digest.update(key.encode())
        digest.update(value if isinstance(value, bytes) else repr(value).encode())
    return f"sha1:{digest.hexdigest()[:16]}"


def _role(name: Any) -> str:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    return roles.get(str(name).lower(), str(name))


def _present(value: Any) -> bool:
    """False for None and for the NaN that pandas-backed blocks use for a missing value."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    return str(value) if _present(value) else ""
