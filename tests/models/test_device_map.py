"""A model placed layer by layer with a ``device_map`` (accelerate's hooks moving the hidden
states between devices) is edited exactly as the plain load: same deltas for every editor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model

from sphere_lightning.cli import cli_main
from sphere_lightning.models import load_model
from sphere_lightning.module import EditingModule
from tests.helpers import EDITORS, tiny_alphaedit_flags
from tests.helpers import make_contract_editor as make_editor

ROOT = Path(__file__).resolve().parents[2]


def layer_by_layer(model) -> dict[str, str | int]:
    """Every module of the tiny Llama on a device of its own: the GPUs in turn where the
    machine has them, else the CPU (accelerate still installs its per-module hooks)."""
    names = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(len(model.model.layers))]]
    names += ["model.norm", "model.rotary_emb", "lm_head"]
    gpus = list(range(torch.cuda.device_count()))
    return {name: gpus[i % len(gpus)] if gpus else "cpu" for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def placed(tiny_model_dir):
    """The tiny Llama loaded plainly, and loaded again then dispatched layer by layer."""
    plain, tokenizer = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    device_map = layer_by_layer(model)
    # force_hooks: with one device accelerate would otherwise just move the model.
    dispatched = dispatch_model(model, device_map=device_map, force_hooks=True)
    return plain, dispatched, tokenizer, device_map


def test_the_dispatched_model_has_accelerate_hooks_on_every_layer(placed):
    _, dispatched, _, device_map = placed
    assert hasattr(dispatched, "hf_device_map") and dispatched.hf_device_map == device_map
    assert all(hasattr(layer, "_hf_hook") for layer in dispatched.model.layers)


@pytest.mark.parametrize("kind", EDITORS)
def test_deltas_equal_the_plain_load(placed, kind, requests, tmp_path):
    plain, dispatched, tokenizer, _ = placed
    deltas = {}
    for label, model in (("plain", plain), ("dispatched", dispatched)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        editor = make_editor(kind, model, tokenizer, str(tmp_path / label))
        editor.setup(model, tokenizer)
        deltas[label] = editor.compute_deltas(model, tokenizer, requests[:3])
        for name, delta in deltas[label].items():
            assert delta.device == model.get_parameter(name).device, name
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]), f"{name} changed"
    assert list(deltas["dispatched"]) == list(deltas["plain"])
    for name, expected in deltas["plain"].items():
        torch.testing.assert_close(deltas["dispatched"][name].cpu(), expected.cpu(), msg=name)
        assert expected.abs().max() > 0, name


def test_lightning_does_not_move_a_placed_model(tiny_model_dir, placed):
    """``.to()`` on the module (what a strategy does to it) leaves a placed model where it is
    (a dtype change stands in for the move on a machine with one device), and moves an
    unplaced one."""
    _, _, _, device_map = placed
    for placement in (device_map, None):
        module = EditingModule(make_editor("memit", None, None, None), model=tiny_model_dir)
        module.device_map = placement
        module.configure_model()
        weights = {n: p for n, p in module.model.named_parameters()}
        module.to(torch.float64)
        after = dict(module.model.named_parameters())
        if placement is None:
            assert all(p.dtype == torch.float64 for p in after.values())
        else:
            assert all(after[n] is p and p.dtype == torch.float32 for n, p in weights.items())


def test_a_whole_run_with_a_device_map_matches_the_plain_run(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    """``--model.device_map`` through the CLI with SPHERE and HE (``configs/edit.yaml``): the
    same edited weights, metrics and HE as the run without it."""
    data = write_rome_json(requests, tmp_path / "facts.json")
    device_map = json.dumps(layer_by_layer(load_model(tiny_model_dir)[0]))
    summaries, weights = {}, {}
    for label, extra in (("plain", []), ("placed", [f"--model.device_map={device_map}"])):
        logs = tmp_path / label
        cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "edit.yaml"),
                f"--model.model={tiny_model_dir}",
                *tiny_alphaedit_flags(),
                f"--data.dataset={data}",
                "--data.num_edits=4",
                "--data.edits_per_step=2",
                f"--trainer.logger.init_args.save_dir={logs}",
                f"--trainer.default_root_dir={logs}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                *extra,
            ]
        )
        (summary,) = logs.rglob("summary.json")
        (checkpoint,) = logs.rglob("last.ckpt")
        summaries[label] = json.loads(summary.read_text())
        weights[label] = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert summaries["placed"]["config"]["model"]["device_map"] == json.loads(device_map)
    for name, tensor in weights["plain"].items():
        torch.testing.assert_close(weights["placed"][name], tensor, msg=name)
    placed, plain = summaries["placed"], summaries["plain"]
    for stage in ("pre", "final"):
        assert placed["edit"][stage] == pytest.approx(plain["edit"][stage])
    assert placed["energy"].keys() == plain["energy"].keys()
    for layer, energy in plain["energy"].items():
        assert placed["energy"][layer] == pytest.approx(energy), layer
