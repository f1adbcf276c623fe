"""The C{c}S{s} bottleneck and TAResSFL: reference parameter counts, stacked clients, the ResSFL regulariser's
effect, the expert's exact resume, phase 2 starting from (and, frozen, keeping) the expert, collapse detection,
the privacy table's claims, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_args

from mocosfl import workflow
from mocosfl.checkpoints import load_latest_checkpoint, save_checkpoint
from mocosfl.cli import main
from mocosfl.config import ConfigError, load_config
from mocosfl.experiments import rows
from mocosfl.experiments.suites import SUITES
from mocosfl.models.resnet import build_split_model, count_params
from mocosfl.privacy.metrics import ssim
from mocosfl.privacy.taressfl import ExpertTrainer, collapse_reason
from mocosfl.seeding import Stream, rng
from mocosfl.sfl import clients as C
from mocosfl.sfl.loop import epoch_batch
from mocosfl.sfl.trainer import MocoSFLTrainer
from pipelines import privacy_table, results

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SIZE = 16
IMAGES = np.random.default_rng(0).integers(0, 256, (96, SIZE, SIZE, 3), dtype=np.uint8)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the bottleneck


@pytest.mark.parametrize(("cut", "params"), [(1, 4164), (3, 78148), (5, 152132)])
def test_c4s2_client_has_the_references_parameter_count_and_smashed_size(cut: int, params: int) -> None:
    client, server = build_split_model(64, cut, bottleneck="C4S2")
    assert count_params(client) == params  # PRIVACY.md: 4,164 / 78,148 / 152,132
    h = client(torch.randn(2, 3, 32, 32))
    assert tuple(h.shape) == (2, 4, 16, 16) and h[0].numel() * h.element_size() == 4096  # vs 262,144 B
    assert tuple(server.backbone[0](h).shape) == (2, 64, 32, 32)  # the transposed conv restores the cut's shape
    assert tuple(server(h).shape) == (2, 1024)


def test_bottleneck_client_runs_stacked_like_one_client_at_a_time() -> None:
    torch.manual_seed(0)
    client, _ = build_split_model(8, 3, bottleneck="C2S2")
    C.check_stackable(client)
    params = C.module_params(client)
    stacked = {k: torch.stack([v + 0.01 * i * torch.randn_like(v) for i in range(3)]) for k, v in params.items()}
    x = torch.randn(3, 2, 3, SIZE, SIZE)  # [M, b, 3, S, S]
    out = C.batched_forward(client, stacked, x)
    for i in range(3):
        client.load_state_dict({k: v[i] for k, v in stacked.items()})
        torch.testing.assert_close(out[i], client(x[i]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("C0S2", "model.bottleneck='C0S2' is invalid"),
        ("4x2", "model.bottleneck='4x2' is invalid: 'none' or C<channels>S<stride>"),
        ("C4S3", "stride 3 must be a power of two that divides data.image_size=32"),
    ],
)
def test_bad_bottleneck_is_a_config_error(value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, "test").replace(**{"model.bottleneck": value})
    assert needle in str(err.value)


# ----------------------------------------------------------------------------- phase 1


def expert(**over: object) -> ExpertTrainer:
    """An expert on 64 auxiliary + 32 target images of 16 px, batch 8 of each, 4 steps."""
    cfg = load_config(PARAMS, "test").replace(
        **{
            "data.image_size": SIZE,
            "partition.num_clients": 2,
            "sfl.clients_per_round": 2,
            "sfl.client_batch_size": 8,
            "sfl.sync_period": "never",
            "pretrain.steps": 4,
            "taressfl.enabled": True,
            "taressfl.batch_size": 8,
            **over,
        }
    )
    return ExpertTrainer(cfg, IMAGES, [np.arange(64), 64 + np.arange(32)], MEAN, STD)


def _client(t: ExpertTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.client.state_dict().items()}


def test_regulariser_changes_the_client_only_when_ssim_exceeds_tau() -> None:
    """tau = 0: the hinge acts at every step, so alpha 2 and alpha 0 clients part after one step while the
    server (which sees the same smashed data at step 0) does not; tau = 0.99: never, the runs are identical."""
    runs = {}
    for alpha, tau in [(2.0, 0.0), (0.0, 0.0), (2.0, 0.99)]:
        t = expert(**{"taressfl.alpha": alpha, "taressfl.target_ssim": tau})
        t.advance()
        runs[alpha, tau] = t
    on, off, never = runs[2.0, 0.0], runs[0.0, 0.0], runs[2.0, 0.99]
    assert on.hinge_steps == off.hinge_steps == 1 and never.hinge_steps == 0
    diff = max((a - b).abs().max().item() for a, b in zip(_client(on).values(), _client(off).values(), strict=True))
    assert diff > 1e-6
    for a, b in zip(on.server.state_dict().values(), off.server.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(_client(never).values(), _client(off).values(), strict=True):
        torch.testing.assert_close(a, b)
    assert len(on.ssim_history) == 1 and -1 <= on.ssim_history[0] <= 1  # the simulator scored the step's batch


def test_regulariser_gradient_lowers_the_simulators_ssim() -> None:
    """The client descends g_r: moving h against it lowers the (eval-mode) simulator's SSIM."""
    t = expert(**{"taressfl.target_ssim": 0.0})
    for _ in range(2):
        t.advance()
    x = torch.from_numpy(IMAGES[:8]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        h = t.client((x - t._mean_t) / t._std_t)
    g = t.regulariser_grad(h.clone(), x)  # trains the simulator one step, then scores it
    assert g.abs().sum() > 0
    t.decoder.eval()
    with torch.no_grad():
        before = ssim(t.decoder(h), x).mean()
        after = ssim(t.decoder(h - 1e-2 * g / g.abs().max()), x).mean()
    assert after < before


def test_expert_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    straight = expert(**{"taressfl.target_ssim": 0.0})
    for _ in range(4):
        straight.advance()
    first = expert(**{"taressfl.target_ssim": 0.0})
    first.advance()
    first.advance()
    save_checkpoint(tmp_path, first.state_dict(), 2)
    resumed = expert(**{"taressfl.target_ssim": 0.0})
    state = load_latest_checkpoint(tmp_path)  # weights_only, as a real resume reads it
    assert state is not None
    resumed.load_state_dict(state)
    resumed.advance()
    resumed.advance()
    for a, b in zip(_client(straight).values(), _client(resumed).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert straight.ssim_history == resumed.ssim_history and straight.hinge_steps == resumed.hinge_steps


def phase_two(freeze: bool) -> MocoSFLTrainer:
    """MocoSFL on the same 96 images as 4 clients (b = 2, all 4 per round), TAResSFL on."""
    cfg = load_config(PARAMS, "test").replace(
        **{
            "data.image_size": SIZE,
            "partition.num_clients": 4,
            "sfl.sample_period": 3,
            "taressfl.enabled": True,
            "taressfl.freeze_clients": freeze,
        }
    )
    return MocoSFLTrainer(cfg, IMAGES, np.array_split(np.arange(96), 4), MEAN, STD)


def test_phase_two_loads_the_experts_models_and_targets() -> None:
    source = expert()
    source.advance()
    payload = source.expert_payload()
    t = phase_two(freeze=True)
    t.load_expert(payload)
    for name, v in payload["client"].items():
        torch.testing.assert_close(t.global_params[name], v, rtol=0, atol=0)
        torch.testing.assert_close(t.global_target[name], payload["client_target"][name], rtol=0, atol=0)
    for part in ("server", "server_target"):
        for k, v in getattr(t, part).state_dict().items():
            torch.testing.assert_close(v, payload[part][k], rtol=0, atol=0)
    for _ in range(4):
        t.advance()
    for name, v in payload["client"].items():  # frozen: the clients keep the expert's weights
        torch.testing.assert_close(t.current_params()[name], v, rtol=0, atol=0)


def test_frozen_clients_receive_no_gradient_bytes() -> None:
    frozen, tuned = phase_two(freeze=True), phase_two(freeze=False)
    for _ in range(4):
        frozen.advance()
        tuned.advance()
    gradient = 4 * (4 * 2) * (8 * SIZE * SIZE) * 4  # steps x M*b x smashed floats (width 8, cut 1) x 4 B
    assert tuned.bytes_down - frozen.bytes_down == gradient
    assert tuned.bytes_up == frozen.bytes_up


def test_epoch_batches_cover_each_pass_once() -> None:
    pool = np.arange(10, 20)

    def draw(source: int):
        return lambda e: rng(0, Stream.EXPERT_EPOCH, source, e)

    seen = np.concatenate([epoch_batch(pool, s, 5, draw(0)) for s in range(2)])
    assert sorted(seen) == list(range(10, 20))  # steps 0-1 are one pass
    assert not np.array_equal(epoch_batch(pool, 0, 5, draw(0)), epoch_batch(pool, 0, 5, draw(1)))  # sources differ
    straddle = epoch_batch(pool, 1, 7, draw(0))  # entries 7-9 of pass 0, then 0-3 of pass 1
    assert len(set(straddle[:3])) == 3 and len(set(straddle[3:])) == 4


def test_collapse_reason() -> None:
    assert collapse_reason(10.5, 5.0, 10, 6000) is not None  # kNN at chance
    flat = 2 * math.log(6001)
    assert "2 ln(K+1)" in (collapse_reason(40.0, flat * 0.995, 10, 6000) or "")
    assert collapse_reason(40.0, 12.0, 10, 6000) is None
    assert collapse_reason(None, None, 10, 6000) is None


# ----------------------------------------------------------------------------- phase 2 end to end


@pytest.mark.integration
def test_phase_two_starts_from_the_expert_and_frozen_clients_keep_it(prepared: list[str]) -> None:
    over = prepared + ["taressfl.enabled=true", "model.cut_layers=3", "model.bottleneck=C4S2", "taressfl.target_ssim=0"]
    assert main(cli_args("pretrain", over)) == 0
    metrics = Path(next(o.split("=", 1)[1] for o in prepared if o.startswith("metrics_dir=")))
    result = json.loads((metrics / "pretrain.json").read_text())
    x = result["taressfl_expert"]
    assert x["steps"] == 4 and x["target_images"] == 0 and x["hinge_active_fraction"] > 0
    weights = torch.load(Path(x["run_dir"]) / "expert.pt", weights_only=True)
    encoder = torch.load(Path(result["run_dir"]) / "encoder.pt", weights_only=True)
    for k, v in weights["client"].items():
        torch.testing.assert_close(encoder["client"][k], v, rtol=0, atol=0)  # frozen: the expert's client
    server = weights["server"]
    assert any(not torch.equal(v, server["backbone." + k]) for k, v in encoder["backbone"].items())  # trained on
    assert result["bytes_down_total"] < result["bytes_up_total"]  # no gradient goes down to frozen clients


@pytest.mark.integration
def test_privacy_row_runs_pretrain_evaluate_and_attack(prepared: list[str]) -> None:
    """One TAResSFL row of the privacy suite on the test profile: the table entry has every column's field."""
    cfg = load_config(PARAMS, "test", prepared)
    row = next(r for r in SUITES["privacy"] if r.label == "TAResSFL-3, C4S2, alpha 2")
    entry = rows.run_row(rows.resolve(cfg, row, "privacy"), log=lambda s: None)
    assert entry["attack_bytes_per_image"] == 4 * 16 * 16 * 4 and entry["bottleneck"] == "C4S2"
    assert entry["expert"]["target_images"] == 20 and entry["taressfl_alpha"] == 2.0
    cells = privacy_table.table_cells(results.aggregate([entry])[0])
    assert len(cells) == len(privacy_table.COLUMNS) and "TAResSFL α=2" in cells


def _entry(label: str, ssim: float, std: float, probe: float = 40.0, **extra: object) -> dict:
    return {
        "label": label,
        "key": label,
        "steps": 10,
        "knn_top1": probe,
        "linear_probe_top1": probe,
        "attack_ssim": ssim,
        "attack_ssim_std": std,
        "attack_floor_mean_image_ssim": 0.3,
        **extra,
    }


def test_privacy_claims_follow_the_seed_spread() -> None:
    table = [
        _entry("MocoSFL-1", 0.80, 0.01),
        _entry("MocoSFL-3", 0.75, 0.03),
        _entry("MocoSFL-5", 0.60, 0.02),
        _entry("TAResSFL-3, C4S2, alpha 2", 0.50, 0.02, probe=35.0),
        _entry("TAResSFL-3, C4S2, alpha 0", 0.52, 0.02, collapsed="kNN top-1 10.0% is at chance (10%)"),
    ]
    text = "\n".join(privacy_table.claims(table, results.verdict))
    assert "falls from MocoSFL-1 to MocoSFL-5: **supported**" in text
    assert "from MocoSFL-1 to MocoSFL-3: **supported**" in text  # 0.05 > 0.04
    assert "α=2 lowers attack SSIM against the α=0 control: **not resolved at this budget**" in text
    assert "not comparable (a collapsed run)" in text
    assert "on 5 of 5 rows" in text


# ----------------------------------------------------------------------------- bad input


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("command", "override", "needle"),
    [
        ("pretrain", "taressfl.target_fraction=1", "taressfl.target_fraction=1.0 is invalid: must be in [0, 1)"),
        ("pretrain", "taressfl.target_fraction=-0.1", "taressfl.target_fraction=-0.1 is invalid"),
        ("pretrain", "taressfl.target_fraction=0.001", "gives 2 of the clients' images, fewer than"),
        ("pretrain", "taressfl.alpha=-1", "taressfl.alpha=-1.0 is invalid"),
        ("pretrain", "model.bottleneck=C4", "model.bottleneck='C4' is invalid"),
    ],
)
def test_bad_taressfl_input_is_one_line(
    prepared: list[str], command: str, override: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(cli_args(command, prepared + ["taressfl.enabled=true", override])) == 2
    line = _one_error(capsys)
    assert needle in line, line


def test_taressfl_for_a_baseline_or_without_auxiliary_images_is_a_config_error(prepared: list[str]) -> None:
    cfg = load_config(PARAMS, "test", prepared + ["taressfl.enabled=true"])
    with pytest.raises(ConfigError, match="applies to MocoSFL only"):
        workflow.pretrain(cfg, method="central")
    ds = workflow.Dataset(cfg)
    shards = workflow.load_partition(cfg, ds)
    ds.train_idx = np.setdiff1d(np.arange(len(ds.prepared.train_y)), ds.val_idx)  # as if no data.train_limit
    with pytest.raises(ConfigError, match="the expert needs images no client holds"):
        workflow.expert_data(cfg, ds, shards)
