"""The training pipeline end to end on loopback: corpus on S3 (moto) -> Ray Data preprocessing
-> Ray Train with DeepSpeed ZeRO-2 on 2 CPU workers, checkpoints on S3 -> MLflow (sqlite)
metrics and a registered model that loads back. A lost worker group resuming from its S3
checkpoint is `tests/test_ray_job.py`'s two-node run (ZeRO-2 too)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from mlflow.tracking import MlflowClient

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import COLOURS, QUESTION, marker_image
from mlops import registry
from mlops.backbone import TINY_LLAVA
from pipelines import preprocess
from pipelines.train import train
from pipelines.training.loop import initial_model, load_vlm
from pipelines.training.config import TrainConfig, load_train_config
from pipelines.training.config_io import from_mapping

BUCKET = "autoselect-test"


def upload_marker_corpus(client, prefix: str, count: int) -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        image, _ = marker_image(rng, colour)
        path = f"images/{i:03d}.png"
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path}", Body=buffer.getvalue())
        records.append({"id": f"m{i}", "image": path, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour}]})
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/corpus.json", Body=json.dumps(records).encode())


@pytest.fixture(scope="module")
def s3_env(moto_s3):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in moto_s3.env.items():
            patch.setenv(key, value)
        moto_s3.client.create_bucket(Bucket=BUCKET)
        yield moto_s3


def test_train_pipeline_checkpoints_on_s3_and_registers_a_scorer_that_loads_back(ray_local, s3_env, tiny_llava_dir, tmp_path, capsys):
    upload_marker_corpus(s3_env.client, "corpus", 24)
    stats = preprocess.run(preprocess.PreprocessConfig(
        input=[f"s3://{BUCKET}/corpus/corpus.json"], output=f"s3://{BUCKET}/pre", model=str(tiny_llava_dir)))
    assert stats["rows_written"] == 24

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_mapping(TrainConfig, {
        "name": "tiny-ft",
        "model": {"path": TINY_LLAVA, "dtype": "float32"},  # compared with float32 models below
        "autoselect": {"budget": 16, "temperature_steps": 6},
        "data": {"train": stats["data"], "batch_size": 2, "decode_cpus": 0},  # 2 CPUs: Ray Data gets 1
        "optim": {"steps": 6, "lr": 1e-3, "checkpoint_every": 2},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": f"s3://{BUCKET}/ray", "max_failures": 0},
        "deepspeed": {"zero_stage": 2},
        "mlflow": {"tracking_uri": tracking, "experiment": "pipeline-test", "registered_model": "tiny-scorer",
                   "artifact_location": (tmp_path / "artifacts").as_uri(), "log_system_metrics": False},
    })
    summary = train(config)
    printed = capsys.readouterr().out
    assert "train step 6/6 (100 %): loss " in printed  # progress on the driver, read back from MLflow
    assert "train step 3/6" in printed.split("train step 6/6")[0]  # and not only at the end

    assert summary["metrics"]["step"] == 6
    assert summary["metrics"]["resumed_from_step"] == -1  # one worker group ran it all (max_failures 0)
    assert summary["checkpoint"].startswith(f"{BUCKET}/ray/")
    listed = s3_env.client.list_objects_v2(Bucket=BUCKET, Prefix="ray/")["Contents"]
    names = {item["Key"].rsplit("/", 1)[-1] for item in listed}
    assert {"mp_rank_00_model_states.pt", "model.safetensors", "config.json"} <= names
    assert any(name.startswith("zero_pp_rank_1") for name in names)  # ZeRO-2 optimiser shard of worker 1

    mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert "resumed_from_step" not in run.data.tags
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert sorted({m.step for m in losses}) == [1, 2, 3, 4, 5, 6]
    for name in ("temperature", "lr", "tokens_per_s", "alpha_mean", "alpha_entropy"):
        assert client.get_metric_history(summary["run_id"], name), name
    version = client.get_model_version("tiny-scorer", summary["version"])
    assert version.tags["budget"] == "16" and version.tags["vision_width"] == "32"
    assert version.tags["vlm_dtype"] == "float32"  # what the workers ran, recorded from their weights' metadata

    registered_dir = registry.download_autoselect(f"models:/tiny-scorer/{summary['version']}", tmp_path / "dl")
    from ray.train import Checkpoint

    pixel_values = torch.randn(2, 3, 32, 32)
    vlm_a, _ = build_tiny_llava(seed=0)
    vlm_b, _ = build_tiny_llava(seed=0)
    from mlops import storage

    fs, path = storage.resolve(f"s3://{summary['checkpoint']}")
    with Checkpoint(path, filesystem=fs).as_directory() as directory:
        trained = AutoSelectModel.from_pretrained(f"{directory}/autoselect", vlm_a).eval()
        loaded = AutoSelectModel.from_pretrained(registered_dir, vlm_b).eval()
        assert torch.equal(trained.score(pixel_values=pixel_values), loaded.score(pixel_values=pixel_values))
    step0 = initial_model(config, torch.device("cpu")).eval()  # the seeded weights training started from
    assert not torch.equal(step0.score(pixel_values=pixel_values), loaded.score(pixel_values=pixel_values))  # it was trained

    scorer_model = mlflow.pyfunc.load_model(f"models:/tiny-scorer/{summary['version']}")
    tokens = loaded.visual_tokens(pixel_values=pixel_values).numpy()
    scores = scorer_model.predict({"visual_tokens": tokens})
    assert np.allclose(scores, loaded.score(pixel_values=pixel_values).numpy(), atol=1e-6)
    kept = scorer_model.predict({"visual_tokens": tokens}, params={"k": 4})  # the signature takes K
    with torch.no_grad():
        assert np.array_equal(kept, loaded.choose(torch.from_numpy(tokens), 4, {}).indices.numpy())


def test_ranks_draw_different_training_noise_from_one_seed():
    """Each Ray Train worker seeds ``seed + rank`` after building the model: the initial scorer is
    the same on every rank, but the noise gate and Gumbel draws differ between ranks (with one seed
    both workers would add identical noise to their different examples) and repeat per rank."""
    from autoselect.testing import build_tiny_llava
    from pipelines.training.loop import seed_worker

    vlm, processor = build_tiny_llava(seed=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    batch = processor(images=[image], text=["USER: <image>\nWhat colour? ASSISTANT: red"], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()

    def first_step(rank: int):
        torch.manual_seed(0)  # as the loop does before attach
        model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).train()
        init = model.scorer.state_dict()
        seed_worker(0, rank)
        return init, float(model(**batch).loss)

    (init0, loss0), (init1, loss1), (_, again0) = first_step(0), first_step(1), first_step(0)
    assert all(torch.equal(init0[k], init1[k]) for k in init0)
    assert loss0 != loss1 and loss0 == again0


def test_resuming_ranks_each_restore_into_a_folder_of_their_own(tmp_path):
    """Ranks resuming on one node must not share Ray's per-checkpoint temporary folder: one rank
    deleting it as the other starts its download failed a two-node resume in CI. Each restore
    gets its own copy, which outlives the other rank's exit and is removed after its own."""
    import pyarrow.fs
    import ray.train
    from pipelines.training.loop import restored

    (tmp_path / "remote" / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "remote" / "checkpoint_000001" / "state.pt").write_text("weights")
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "remote"), pyarrow.fs.LocalFileSystem())
    checkpoint = ray.train.Checkpoint("checkpoint_000001", filesystem=remote)  # downloaded, as from S3

    with restored(checkpoint) as first:
        with restored(checkpoint) as second:
            assert first != second and checkpoint._get_temporary_checkpoint_dir() not in (first, second)
            assert (Path(second) / "state.pt").read_text() == "weights"
        assert not Path(second).exists()
        assert (Path(first) / "state.pt").read_text() == "weights"
    assert not Path(first).exists()


def test_config_errors_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: {stpes: 3}\n")
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['stpes'\]"):
        load_train_config(bad)
    bad.write_text("name: x\nautoselect: {budget: 0}\n")
    with pytest.raises(ValueError, match="budget must be a positive number"):
        load_train_config(bad)
    bad.write_text("name: x\nray: {num_workers: two}\n")
    with pytest.raises(ValueError, match="ray.num_workers: expected int"):
        load_train_config(bad)
    bad.write_text("name: x\ndata: {decode_cpus: -1}\n")
    with pytest.raises(ValueError, match="decode_cpus must be >= 0"):
        load_train_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: x\n")
    assert load_train_config(good, ["deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3


def test_config_autoselect_option_groups_nest_in_yaml_and_set(tmp_path):
    """``autoselect:`` maps onto AutoSelectConfig: its option groups are nested mappings (and
    ``--set`` paths); unknown nested keys, old flat names and broken dependencies fail by name."""
    from autoselect import InferenceOptions, OptionDependencyError, TrainingOptions
    from pipelines.training.config_io import UnknownKeys

    path = tmp_path / "c.yaml"
    path.write_text("name: x\nautoselect: {budget: 8, training: {gate_attention: true}}\n")
    config = load_train_config(path, ["autoselect.training.straight_through=true", "autoselect.inference.noise=1.0"])
    assert config.autoselect.training == TrainingOptions(gate_attention=True, straight_through=True)
    assert config.autoselect.inference == InferenceOptions(noise=1.0)
    assert config.autoselect_config() == config.autoselect and config.autoselect_config() is not config.autoselect
    assert from_mapping(TrainConfig, json.loads(json.dumps(config.to_dict()))) == config  # what the workers rebuild
    with pytest.raises(UnknownKeys, match=r"autoselect.training: unknown key\(s\) \['gate_atention'\]"):
        load_train_config(path, ["autoselect.training.gate_atention=true"])
    with pytest.raises(UnknownKeys, match="gate_attention is now training.gate_attention"):
        load_train_config(path, ["autoselect.gate_attention=true"])
    with pytest.raises(OptionDependencyError, match="autoselect.training: training.straight_through needs"):
        load_train_config(path, ["autoselect.training.straight_through=true", "autoselect.training.gate_attention=false"])
    with pytest.raises(ValueError, match="autoselect.inference.noise: expected float"):
        load_train_config(path, ["autoselect.inference.noise=lots"])


def test_config_gradient_checkpointing_switch_reaches_the_workers_model(tmp_path):
    """``model.gradient_checkpointing`` (off by default) checkpoints the LLM of the model every worker builds."""
    path = tmp_path / "c.yaml"
    path.write_text(f"name: x\nmodel: {{path: {TINY_LLAVA}}}\nautoselect: {{budget: 16}}\n")
    assert not initial_model(load_train_config(path), torch.device("cpu")).gradient_checkpointing
    config = load_train_config(path, ["model.gradient_checkpointing=true"])
    assert from_mapping(TrainConfig, json.loads(json.dumps(config.to_dict()))) == config  # what the workers rebuild
    model = initial_model(config, torch.device("cpu"))
    assert model.gradient_checkpointing and not model.vlm.training


def test_config_k28_sampled_recipe_is_the_committed_scorers_config():
    """``pipelines/configs/mini-llava-k28-sampled.yaml`` is the recipe of
    ``artifacts/mini-llava/scorer-k28-sampled`` (its README's historical ``--set`` flags)."""
    root = Path(__file__).resolve().parent.parent
    config = load_train_config(root / "pipelines" / "configs" / "mini-llava-k28-sampled.yaml")
    saved = AutoSelectConfig.load(root / "artifacts" / "mini-llava" / "scorer-k28-sampled" / "config.json")
    assert config.autoselect == AutoSelectConfig(**{**vars(saved), "vision_width": None, "backbone": None})
    historical = [  # the README's command, with today's option paths
        "model.dtype=float32", "data.train=outputs/results/preprocessed/data", "optim.steps=100",
        "optim.checkpoint_every=50", "optim.log_every=5", "optim.lr=1.0e-3", "autoselect.temperature_steps=75",
        "autoselect.training.gate_attention=true", "autoselect.training.score_noise=1.0",
        "autoselect.training.score_noise_anneal=false", "autoselect.inference.noise=1.0",
        "autoselect.position_policy=original", "mlflow.registered_model=autoselect-mini-llava-results",
        "name=results-mini-llava-k28-sampled",
    ]
    assert config == load_train_config(root / "pipelines" / "configs" / "mini-llava.yaml", historical)


@pytest.mark.parametrize("recipe, scorer, decode", [
    ("mini-llava-scenes.yaml", "mini-llava-scenes-R2/scorer", ("topk_dpp", 0.5)),  # session 29's recipe, read by C (session 37)
    ("mini-llava-scenes-captions.yaml", "mini-llava-scenes-drop2/scorer", ("dpp", 0.5)),  # the session-19 recipe (paper form)
])
def test_config_scenes_recipe_is_the_committed_scenes_scorers_config(recipe, scorer, decode):
    """A scenes recipe and its committed scorer agree, the val-chosen decode included, so a
    retrained scorer serves what docs/results.md measured."""
    root = Path(__file__).resolve().parent.parent
    config = load_train_config(root / "pipelines" / "configs" / recipe)
    saved = AutoSelectConfig.load(root / "artifacts" / scorer / "config.json")
    assert config.autoselect == AutoSelectConfig(**{**vars(saved), "vision_width": None, "backbone": None})
    assert (saved.inference.decode, saved.inference.dpp_quality_scale) == decode


def commented_command(text: str, script: str) -> list[str]:
    """The arguments of the ``python <script> ...`` command a config's header comment gives (its
    continuation lines joined), as the shell would split them."""
    import shlex

    lines = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    first = next(i for i, line in enumerate(lines) if f"python {script}" in line)
    command = lines[first]
    for line in lines[first + 1:]:
        if not command.endswith("\\"):
            break
        command = command[:-1] + " " + line
    words = shlex.split(command)
    return words[words.index(script) + 1:]


def test_demo_runs_the_shipped_recipe_with_its_scorer_backbone_and_export():
    """`make demo` registers the committed scorer as champion and trains a challenger by the shipped
    recipe: both must sit on the recipe's backbone and export, or promotion compares unlike things."""
    from pipelines import packaged_corpora
    from pipelines.corpora import ExportSettings
    from tests.support.scripts import load_script

    root = Path(__file__).resolve().parent.parent
    demo = load_script("examples/demo.py")
    recipe = root / demo.RECIPE
    config = load_train_config(recipe)
    assert recipe.name == "mini-llava-scenes.yaml"  # the recipe docs/results.md reports
    assert Path(config.model.path) == demo.BACKBONE
    saved = AutoSelectConfig.load(root / demo.CHAMPION / "config.json")
    assert config.autoselect == AutoSelectConfig(**{**vars(saved), "vision_width": None, "backbone": None})
    header = recipe.read_text().split("\nname:")[0]
    export = packaged_corpora.build_parser().parse_args(commented_command(header, "pipelines/packaged_corpora.py"))
    assert Path(export.out) == demo.CORPORA  # the export the recipe's comment builds with the CLI ...
    assert packaged_corpora.settings_from_args(export) == ExportSettings(**demo.SCENES)  # ... with the same settings
    assert f"--tasks {' '.join(demo.TRAIN_TASKS)}" in header


def test_demo_workload_follows_the_dtype_the_vlm_runs_in(monkeypatch):
    """A float32 VLM (a CPU without native bf16) gets the shorter demo; flags given are kept."""
    import mlops.backbone
    from tests.support.scripts import load_script

    demo = load_script("examples/demo.py")
    monkeypatch.setattr(mlops.backbone, "default_device", lambda: torch.device("cpu"))  # a GPU machine too
    for native_bf16, dtype, workload in (("0", "float32", (40, 64)), ("1", "bfloat16", (60, 120))):
        monkeypatch.setenv(mlops.backbone.CPU_BF16_ENV, native_bf16)
        args = demo.build_parser().parse_args([])
        assert demo.fill_workload(args) == dtype and (args.train_steps, args.eval_limit) == workload
        args = demo.build_parser().parse_args(["--train-steps", "7", "--eval-limit", "16"])
        assert demo.fill_workload(args) == dtype and (args.train_steps, args.eval_limit) == (7, 16)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("pipelines/configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    config = load_train_config(path)
    assert config.name and config.autoselect_config().budget
    assert config.deepspeed.zero_stage in (1, 2, 3)


def test_native_resolution_backbone_trains_through_the_pipeline(ray_local, tmp_path):
    """Qwen2.5-VL (N differs per image): local corpus of mixed image sizes -> Ray Data -> Ray Train
    with DeepSpeed on 2 workers -> a registered scorer that loads back onto the backbone."""
    from PIL import Image

    from mlops.backbone import load_processor

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    records = []
    for i in range(12):  # 3 steps of 2 workers x 2 rows: one epoch (each epoch starts Ray Data's decoding actor anew)
        height, width = [(32, 32), (24, 40), (40, 24), (16, 48)][i % 4]
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(corpus / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "a square"}]})
    (corpus / "corpus.json").write_text(json.dumps(records))
    model = "autoselect-testing/tiny-qwen2_5_vl"
    stats = preprocess.run(preprocess.PreprocessConfig(
        input=[str(corpus / "corpus.json")], output=str(tmp_path / "pre"), model=model))
    assert stats["rows_written"] == 12

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_mapping(TrainConfig, {
        "name": "tiny-qwen",
        "model": {"path": model, "dtype": "float32"},
        "autoselect": {"budget": 0.5, "temperature_steps": 3},
        "data": {"train": stats["data"], "batch_size": 2, "decode_cpus": 0},  # 2 CPUs: Ray Data gets 1
        "optim": {"steps": 3, "lr": 1e-3, "checkpoint_every": 3},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "ray"), "max_failures": 0},
        "deepspeed": {"zero_stage": 2},
        "mlflow": {"tracking_uri": tracking, "experiment": "qwen-test", "registered_model": "tiny-qwen-scorer",
                   "artifact_location": (tmp_path / "artifacts").as_uri(), "log_system_metrics": False},
    })
    summary = train(config)
    assert summary["metrics"]["step"] == 3 and np.isfinite(summary["metrics"]["loss"])

    mlflow.set_tracking_uri(tracking)
    version = MlflowClient().get_model_version("tiny-qwen-scorer", summary["version"])
    assert version.tags["vision_width"] == "128"  # a merge unit: 4 patches x 32
    directory = registry.download_autoselect(f"models:/tiny-qwen-scorer/{summary['version']}", tmp_path / "dl")
    processor = load_processor(model)
    loaded = AutoSelectModel.from_pretrained(directory, load_vlm(config, torch.device("cpu"))).eval()  # the config's dtype
    step0 = initial_model(config, torch.device("cpu")).eval()  # the seeded weights training started from
    inputs = processor(images=[Image.open(corpus / "images" / "1.png")], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt")
    image_inputs = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    assert not torch.equal(loaded.score(**image_inputs)[0], step0.score(**image_inputs)[0])  # it was trained


def test_progress_lines_show_rate_and_eta_from_the_tracked_loss(tmp_path):
    from pipelines.training.progress import TrainingProgress, progress_line

    assert progress_line(40, 80, 1.2345, 12.3) == "train step 40/80 (50 %): loss 1.234, 12.3 s/step, ETA 8m12s"
    assert progress_line(1, 80, 2.0, None) == "train step 1/80 (1 %): loss 2.000"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        for step, stamp in ((5, 1_000_000), (10, 1_010_000)):
            mlflow.log_metric("loss", 1.0 / step, step=step, timestamp=stamp)
    lines: list[str] = []
    progress = TrainingProgress(mlflow.get_tracking_uri(), run.info.run_id, 20, emit=lines.append)
    progress.poll()
    progress.poll()  # nothing new: nothing printed twice
    assert lines == ["train step 5/20 (25 %): loss 0.200", "train step 10/20 (50 %): loss 0.100, 2.0 s/step, ETA 0m20s"]


ZERO3_STEPS = r'''
import os, sys, torch
import deepspeed
from autoselect import AutoSelectConfig, AutoSelectModel, TrainingOptions
from autoselect.testing import build_tiny_llava
from autoselect.training import compute_loss

def run(stage, checkpointing):
    vlm, processor = build_tiny_llava(seed=0)
    from tests.support.inputs import PROMPTS, square_images
    batch = dict(processor(images=square_images(2), text=PROMPTS, return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == vlm.config.image_token_id, -100)
    torch.manual_seed(0)
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, training=TrainingOptions(gate_attention=True)))
    if checkpointing:
        model.enable_gradient_checkpointing()
    calls = []
    for layer in vlm.get_decoder().layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    losses = []
    for step in range(2):
        torch.manual_seed(step)
        loss, _ = compute_loss(model, batch, step, forward=engine)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    with deepspeed.zero.GatheredParameters(list(model.scorer.parameters()), modifier_rank=None):
        weights = torch.cat([p.detach().flatten().clone() for p in model.scorer.parameters()])
    return losses, weights, len(calls)

deepspeed.init_distributed(dist_backend="gloo")
(plain, w_plain, n_plain), (ckpt, w_ckpt, n_ckpt) = run(3, False), run(3, True)
assert n_plain == 4 and n_ckpt == 8, (n_plain, n_ckpt)  # 2 steps x 2 layers, each recomputed once with checkpointing
assert torch.allclose(torch.tensor(plain), torch.tensor(ckpt), rtol=1e-6), (plain, ckpt)
assert torch.allclose(w_plain, w_ckpt, rtol=1e-5, atol=1e-7)
print("ZERO3-CHECKPOINTING-OK")
'''


def test_config_gradient_checkpointing_trains_under_zero3_with_the_same_steps():
    """The Qwen2.5-VL config's pairing: DeepSpeed ZeRO-3 partitions the frozen VLM too, and a
    non-reentrant recompute over partitioned frozen weights failed in older DeepSpeed releases
    (deepspeedai/DeepSpeed#8148). Two steps with and without checkpointing: same losses, same scorer.
    In a subprocess (one process, gloo): the test process keeps no torch.distributed group."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", ZERO3_STEPS], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert "ZERO3-CHECKPOINTING-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_placement_strategy_reaches_ray_train_and_bad_values_are_named(tmp_path):
    from pipelines.train import scaling_config

    good = tmp_path / "good.yaml"
    good.write_text("name: x\n")
    assert scaling_config(load_train_config(good)).placement_strategy == "PACK"  # Ray Train's default
    spread = load_train_config(good, ["ray.placement_strategy=STRICT_SPREAD", "ray.num_workers=3"])
    assert (scaling_config(spread).placement_strategy, scaling_config(spread).num_workers) == ("STRICT_SPREAD", 3)
    with pytest.raises(ValueError, match=r"ray: placement_strategy must be one of \['PACK', 'SPREAD', "
                                         r"'STRICT_PACK', 'STRICT_SPREAD'\], got 'SPRED'"):
        load_train_config(good, ["ray.placement_strategy=SPRED"])


def test_a_worker_stream_shuffles_reproducibly_and_a_resume_skips_the_same_batches(ray_local, monkeypatch):
    """``data.shuffle_buffer``: each worker's rows come shuffled over the buffer, the same for the
    same seed (a resumed run skips exactly the batches it had seen), differently for another seed
    (epoch or rank); 0 keeps file order. Every row still comes once per epoch."""
    import ray

    from pipelines.train import ingest_options
    from pipelines.training import loop

    monkeypatch.setattr(loop, "examples_from_table", lambda table: table.column("row").to_pylist())
    monkeypatch.setattr(loop, "collate", lambda examples, pad: examples)
    dataset = ray.data.range(64).rename_columns({"id": "row"})
    dataset.context.execution_options = ingest_options()  # what train.py gives Ray Train's ingest
    shard = dataset.iterator()

    def epoch(skip=0, buffer=0, seed=None):
        return list(loop.batches(shard, 4, 0, skip, buffer, seed))

    assert [row for batch in epoch() for row in batch] == list(range(64))
    shuffled = epoch(buffer=32, seed=7)
    assert sorted(row for batch in shuffled for row in batch) == list(range(64))
    assert [row for batch in shuffled for row in batch] != list(range(64))
    assert epoch(buffer=32, seed=7) == shuffled
    assert epoch(skip=3, buffer=32, seed=7) == shuffled[3:]
    assert epoch(buffer=32, seed=8) != shuffled
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0 rows, got -1"):
        from_mapping(TrainConfig, {"data": {"train": "x", "shuffle_buffer": -1}})
