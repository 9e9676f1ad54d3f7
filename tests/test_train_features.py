"""accelops.train features of issue 8: lr range test, early stopping (resume, 2 gloo ranks),
per-group lr columns, validation splits, the config seed, named losses with weights, MLflow.

Tiny models and data (those of test_train.py); single process except one forked 2-rank run."""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import pickle
import random
import sys
import tempfile
import traceback

import pytest
import torch
import torch.nn.functional as F

from accelops.train import (
    EarlyStopping,
    LRFindResult,
    Trainer,
    list_checkpoints,
    load_char_corpus,
    load_checkpoint,
    lr_find,
    split_dataset,
)
from accelops.train.config import ConfigError, build
from accelops.train.run import run

from .helpers import rank_results, run_forked_ranks
from .test_train import SEQ, TEXT, TRAIN, VAL, VOCAB, _config, _csv_losses, losses, make_trainer, params, tiny_model

pytestmark = pytest.mark.one_thread


def _csv_rows(log_dir):
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _opt_state(opt):
    sd = opt.state_dict()
    return {
        "groups": json.dumps(sd["param_groups"], default=str),
        "state": {
            k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in sd["state"].items()
        },
    }


def _same_opt_state(a, b):
    assert a["groups"] == b["groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for n, v in a["state"][k].items():
            w = b["state"][k][n]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (k, n)


# --------------------------------------------------------------------------- lr range test


def test_lr_find_sweeps_suggests_and_restores_everything(tmp_path):
    model = tiny_model(dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # some optimizer state to keep: one real step first
    _, loss = model(*[torch.stack(t) for t in zip(TRAIN[0], TRAIN[1])])
    loss.backward()
    opt.step()
    opt.zero_grad()
    before_w, before_opt = params(model), _opt_state(opt)
    torch.manual_seed(7)
    random.seed(7)
    expected_rand = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)

    res = lr_find(model, opt, TRAIN, batch_size=4, min_lr=1e-4, max_lr=1.0, num_steps=30, skip_start=3)
    assert isinstance(res, LRFindResult) and 3 < len(res.lrs) <= 30
    ratios = [b / a for a, b in zip(res.lrs, res.lrs[1:])]
    assert res.lrs[0] == pytest.approx(1e-4) and all(r == pytest.approx(10 ** (4 / 29)) for r in ratios)
    assert len(res.losses) == len(res.raw_losses) == len(res.lrs)
    # the first smoothed point is bias-corrected: it equals the first raw loss
    assert res.losses[0] == pytest.approx(res.raw_losses[0])
    assert res.suggestion is not None and res.reason is None, res.reason
    i = res.suggestion_index
    assert 3 <= i < len(res.lrs) - 1 and res.suggestion == res.lrs[i]
    # the steepest descent is a descent
    assert res.losses[i + 1] < res.losses[i - 1]

    for k, v in before_w.items():
        assert torch.equal(model.state_dict()[k], v), k
    _same_opt_state(before_opt, _opt_state(opt))
    assert opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.rand(3), expected_rand[0]) and random.random() == expected_rand[1]
    assert model.training

    pytest.importorskip("matplotlib", reason="matplotlib is not installed: the PNG is not written")
    path = res.plot(tmp_path / "sub" / "lr.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """What the trainer saves per rank and lr_find restores: every generator draws again
    what it drew after the state was taken, after torch.save / torch.load(weights_only=True)."""
    from accelops.train.rng import rng_state, seed_everything, set_rng_state

    np = pytest.importorskip("numpy")
    seed_everything(3)
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    first = (torch.rand(4), random.random(), np.random.rand(4))
    seed_everything(4)  # elsewhere
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = (torch.rand(4), random.random(), np.random.rand(4))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and (first[2] == again[2]).all()


def test_metrics_files_add_columns_and_continue_from_a_step(tmp_path):
    from accelops.train.metrics_files import CSV_FIELDS, MetricsFiles

    files = MetricsFiles(str(tmp_path), 0)
    files.write([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    files.write([{"step": 3, "loss": 1.0, "lr-group1": 0.1}])  # a new column: the file is rewritten
    files.close()
    files.close()  # a second close does nothing
    rows = _csv_rows(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[0]["lr-group1"] == "" and rows[2]["lr-group1"] == "0.1"
    files = MetricsFiles(str(tmp_path), 2)  # resumed from step 2: step 3 is written again
    files.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == [*CSV_FIELDS, "lr-group1"]
    assert [r["step"] for r in _csv_rows(tmp_path)] == ["1", "2"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fit_after_lr_find_is_the_fit_without_it(precision):
    plain = make_trainer(4)
    plain.fit()
    probed = make_trainer(4)
    res = lr_find(probed.model, probed.optimizer, TRAIN, batch_size=4, num_steps=12, skip_start=2, precision=precision)
    assert len(res.lrs) >= 2
    probed.fit()
    assert losses(probed) == losses(plain)  # bit for bit: weights, Adam state, lr, RNG restored


class _Blowup(torch.nn.Module):
    """Loss x^2 under SGD: x <- x (1 - 2 lr), so any lr >= 1 makes it grow at once."""

    def __init__(self, nan=False):
        super().__init__()
        self.x = torch.nn.Parameter(torch.ones(()))
        self.nan = nan

    def forward(self, tokens, targets):
        return self.x**2 * (float("nan") if self.nan else 1.0) + 0.0 * tokens.float().mean()


def test_lr_find_reports_immediate_divergence_instead_of_a_suggestion(tmp_path):
    model = _Blowup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = lr_find(model, opt, TRAIN, batch_size=4, min_lr=1.5, max_lr=100.0, num_steps=50, beta=0.0)
    assert res.suggestion is None and res.stopped_early is not None
    assert "diverged too early" in res.reason and "passed 4 x its best" in res.reason
    assert len(res.lrs) < 50 and model.x.item() == 1.0  # the weight came back

    m = _Blowup(nan=True)
    res = lr_find(m, torch.optim.SGD(m.parameters(), lr=0.1), TRAIN, batch_size=4)
    assert res.suggestion is None and len(res.lrs) == 1 and "loss is nan at step 0" in res.reason
    # a sweep over which the loss only grows: no bogus "steepest descent"
    m = _Blowup()
    res = lr_find(
        m,
        torch.optim.SGD(m.parameters(), lr=0.1),
        TRAIN,
        batch_size=4,
        min_lr=1.2,
        max_lr=1.3,
        num_steps=20,
        skip_start=0,
        diverge_threshold=None,
    )
    assert res.suggestion is None and "never decreased" in res.reason
    assert "suggestion None" in repr(res)
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: the PNG is not written")
    assert open(res.plot(tmp_path / "none.png"), "rb").read(4) == b"\x89PNG"  # a plot without a suggestion


def test_lr_find_refuses_bad_arguments_and_several_ranks(monkeypatch):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="min_lr must be below max_lr"):
        lr_find(model, opt, TRAIN, min_lr=1.0, max_lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        lr_find(model, opt, TRAIN, num_steps=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        lr_find(model, opt, TRAIN, batch_size=1000)
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    with pytest.raises(RuntimeError, match="one process; this one is rank 1 of 2"):
        lr_find(model, opt, TRAIN)


def test_lr_find_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    m = _Blowup()
    res = lr_find(m, torch.optim.SGD(m.parameters(), lr=0.1), TRAIN, batch_size=4, num_steps=5, skip_start=0)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="needs matplotlib.*pip install matplotlib"):
        res.plot(tmp_path / "x.png")


def test_cli_lr_find_prints_the_suggestion_and_writes_the_plot(tmp_path, capsys):
    from accelops.cli import main

    config = _config(tmp_path)
    config["lr_find"] = {"num_steps": 25, "min_lr": 1e-4, "max_lr": 1.0, "skip_start": 3}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert main(["train", str(path), "--lr-find"]) == 0
    err = capsys.readouterr().err
    assert "suggested lr" in err
    with open(tmp_path / "log" / "lr_find.json") as f:
        out = json.load(f)
    assert out["suggestion"] is not None and f"{out['suggestion']:.3g}" in err and len(out["lrs"]) <= 25
    assert not list_checkpoints(tmp_path / "ckpt")  # nothing trained or saved
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in err
    else:
        assert (tmp_path / "log" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one process"):
        main(["train", str(path), "--lr-find", "--nproc-per-node", "2"])
    with pytest.MonkeyPatch.context() as mp:  # under torchrun: refused, not run on every rank
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="one process.*without torchrun"):
            main(["train", str(path), "--lr-find"])
    config["lr_find"]["nonsense"] = 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\[lr_find\] has unknown key"):
        main(["train", str(path), "--lr-find"])


# --------------------------------------------------------------------------- early stopping

# min_delta far above any change the val loss can make: only the first evaluation counts as
# an improvement, so the stop step is known in advance (patience p, every e steps: (p + 1) e)
# while the model trains for real.
NEVER_BETTER = {"monitor": "val_loss", "patience": 3, "min_delta": 100.0, "mode": "min"}


def test_early_stopping_stops_with_the_reason(tmp_path, caplog):
    t = make_trainer(40, eval_every=2, eval_batches=1, log_dir=tmp_path, early_stopping=NEVER_BETTER)
    with caplog.at_level("INFO", logger="accelops.train"):
        out = t.fit()
    assert out["step"] == 8 and t.step == 8
    assert out["stop_reason"].startswith("early stopping at step 8: val_loss did not improve by more than 100")
    assert "best" in out["stop_reason"] and "at step 2" in out["stop_reason"]
    assert any("early stopping at step 8" in r.getMessage() for r in caplog.records)
    assert [e["step"] for e in t.evals] == [2, 4, 6, 8]
    # a real improvement resets the wait; mode "max" on a falling loss never improves
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert [es.update({"val_loss": v}, s) for s, v in enumerate([3.0, 2.95, 2.5, 2.45, 2.44])] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert es.best == 2.5 and es.best_step == 2
    es = EarlyStopping(patience=5)
    assert es.update({"val_loss": float("nan")}, 3) and "nan" in es.reason
    no_es = make_trainer(4, eval_every=2, eval_batches=1).fit()
    assert no_es["stop_reason"] is None and no_es["step"] == 4


def test_cli_early_stopping_key(tmp_path, capsys):
    from accelops.cli import main

    path = tmp_path / "run.json"
    path.write_text(json.dumps(_config(tmp_path, max_steps=40, eval_every=2, checkpoint_every=2)))
    spec = json.dumps(dict(NEVER_BETTER, patience=1))
    assert main(["train", str(path), "--set", f"train.early_stopping={spec}"]) == 0
    err = capsys.readouterr().err
    assert "step 4, train loss" in err and "early stopping at step 4: val_loss did not improve" in err
    assert list_checkpoints(tmp_path / "ckpt")[0][0] == 4


def test_early_stopping_bad_settings_are_refused():
    with pytest.raises(ValueError, match="needs val_data and eval_every"):
        make_trainer(4, early_stopping={"patience": 2})  # eval_every=None
    with pytest.raises(ValueError, match="unknown key"):
        make_trainer(4, eval_every=2, early_stopping={"patiense": 2})
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="best")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    t = make_trainer(4, eval_every=2, eval_batches=1, early_stopping={"monitor": "val_acc"})
    with pytest.raises(ValueError, match="monitors 'val_acc' but the evaluation reports.*val_loss"):
        t.fit()


def test_early_stopping_counters_survive_resume(tmp_path):
    kw = dict(eval_every=2, eval_batches=1, checkpoint_every=2, early_stopping=NEVER_BETTER)
    full = make_trainer(40, checkpoint_dir=tmp_path / "full", **kw)
    assert full.fit()["step"] == 8
    make_trainer(4, checkpoint_dir=tmp_path / "cut", **kw).fit()  # stops at 4: best at 2, waited 1
    state = load_checkpoint(list_checkpoints(tmp_path / "cut")[0][1])
    assert state["early_stopping"]["wait"] == 1 and state["early_stopping"]["best_step"] == 2
    resumed = make_trainer(40, model_seed=3, checkpoint_dir=tmp_path / "cut", **kw)
    out = resumed.fit()
    assert out["step"] == 8 and out["stop_reason"] == full.stop_reason  # not 12: the counters came back
    assert losses(resumed) == losses(full)[4:]
    # the stopped run, started again: it stays stopped, nothing more is trained
    again = make_trainer(40, checkpoint_dir=tmp_path / "cut", **kw)
    out = again.fit()
    assert out["step"] == 8 and again.history == [] and out["stop_reason"] == full.stop_reason


def _es_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res = {}
    try:
        # rank 1 is given a patience it would wait 50 evaluations for: rank 0's decision rules
        es = dict(NEVER_BETTER, patience=2 if rank == 0 else 50)
        t = make_trainer(40, eval_every=2, eval_batches=1, early_stopping=es)
        out = t.fit()
        res = {"out": out, "losses": losses(t), "evals": t.evals, "params": params(t.model)}
        two = _two_head_trainer(3, loss_weights={"loss_b": 0.5}, eval_every=3)  # named losses under DDP
        two.fit()
        res["two_head"] = (two.history, two.evals)
        # The DDP reducers go before the process group they use: a gloo group destroyed while
        # reducers still hold it can hang this process's exit.
        two.ddp = t.ddp = None
        del two
        gc.collect()
        t.close()
    except BaseException:
        res["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def test_early_stopping_two_ranks_stop_together():
    with tempfile.TemporaryDirectory() as d:
        run_forked_ranks(_es_worker, d)
        got = rank_results(d)
    r0, r1 = got
    assert r0["out"]["step"] == r1["out"]["step"] == 6
    assert r0["out"]["stop_reason"] == r1["out"]["stop_reason"] and "step 6" in r0["out"]["stop_reason"]
    assert r0["losses"] == r1["losses"] and r0["evals"] == r1["evals"]
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    # named losses: components are means over ranks; 2 ranks x 4 = one process's batch of 8
    single = _two_head_trainer(3, loss_weights={"loss_b": 0.5}, eval_every=3, batch_size=8)
    single.fit()
    (h0, e0), (h1, e1) = r0["two_head"], r1["two_head"]
    keys = ("step", "loss", "loss_a", "loss_b")
    assert [[h[k] for k in keys] for h in h0] == [[h[k] for k in keys] for h in h1] and e0 == e1
    for name in ("loss", "loss_a", "loss_b"):
        assert [h[name] for h in h0] == pytest.approx([h[name] for h in single.history], rel=1e-5), name
    for name in ("val_loss", "val_loss_a", "val_loss_b"):
        assert e0[-1][name] == pytest.approx(single.evals[-1][name], rel=1e-5), name


# --------------------------------------------------------------------------- lr per param group


def test_lr_is_logged_per_param_group(tmp_path):
    model = tiny_model()
    emb = [p for n, p in model.named_parameters() if "emb" in n]
    rest = [p for n, p in model.named_parameters() if "emb" not in n]
    opt = torch.optim.AdamW([{"params": emb, "lr": 1e-3}, {"params": rest, "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4)
    t = Trainer(
        model,
        opt,
        TRAIN,
        max_steps=4,
        batch_size=4,
        eval_every=None,
        log_every=2,
        scheduler=sched,
        progress=False,
        log_dir=tmp_path,
    )
    t.fit()
    rows = [r for r in _csv_rows(tmp_path) if r["loss"]]
    assert [float(r["lr-group0"]) for r in rows] == pytest.approx([1e-3 * s / 4 for s in (1, 2, 3, 4)])
    assert [float(r["lr-group1"]) for r in rows] == pytest.approx([1e-2 * s / 4 for s in (1, 2, 3, 4)])
    assert [float(r["lr"]) for r in rows] == [float(r["lr-group0"]) for r in rows]
    assert t.history[0]["lr-group1"] == pytest.approx(1e-2 / 4)
    # one group: the plain lr column only
    single = make_trainer(2, log_dir=tmp_path / "one")
    single.fit()
    assert "lr-group0" not in _csv_rows(tmp_path / "one")[0] and "lr-group0" not in single.history[0]


# --------------------------------------------------------------------------- validation splits, seed


def test_validation_split_options(tmp_path):
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    train_file.write_text(TEXT, encoding="utf-8")
    val_file.write_text("zebra quiz. " * 10, encoding="utf-8")  # characters the training text lacks
    tr, va, vocab = load_char_corpus(train_file, SEQ, val_path=val_file, val_fraction=None)
    assert tr.tokens.numel() == len(TEXT) and vocab.decode(va.tokens) == "zebra quiz. " * 10
    assert set("zq") <= set(vocab.chars)
    with pytest.raises(ValueError, match="both given"):
        load_char_corpus(train_file, SEQ, val_path=val_file, val_fraction=0.2)
    tr2, va2, _ = load_char_corpus(train_file, SEQ, val_fraction=0.25)  # today's contiguous split
    assert tr2.tokens.numel() == int(len(TEXT) * 0.75)

    a_train, a_val = split_dataset(TRAIN, 0.2, seed=1)
    torch.manual_seed(99)  # the global RNG does not matter
    b_train, b_val = split_dataset(TRAIN, 0.2, seed=1)
    assert a_val.indices == b_val.indices and a_train.indices == b_train.indices
    assert len(a_val) == round(len(TRAIN) * 0.2) and sorted(a_train.indices + a_val.indices) == list(range(len(TRAIN)))
    assert split_dataset(TRAIN, 0.2, seed=2)[1].indices != a_val.indices
    assert split_dataset(TRAIN, 0.2, shuffle=False)[1].indices == list(range(len(TRAIN) - len(a_val), len(TRAIN)))
    with pytest.raises(ValueError, match="val_fraction"):
        split_dataset(TRAIN, 1.0)
    model = tiny_model()
    out = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), a_train, a_val, max_steps=2, batch_size=4, progress=False
    ).fit()
    assert math.isfinite(out["val_loss"])

    # the config: [data] val_path, or val_fraction, not both
    config = _config(tmp_path)
    config["data"]["val_path"] = str(val_file)
    trainer, vocab = build(json.loads(json.dumps(config)))
    assert vocab.decode(trainer.val_data.tokens) == "zebra quiz. " * 10
    config["data"]["val_fraction"] = 0.2
    with pytest.raises(ConfigError, match="both val_path and val_fraction"):
        build(config)


def test_config_seed_makes_runs_bit_identical(tmp_path):
    def go(name, seed):
        config = _config(
            tmp_path,
            max_steps=4,
            eval_every=2,
            checkpoint_dir=str(tmp_path / name / "ckpt"),
            log_dir=str(tmp_path / name),
            seed=seed,
        )
        random.seed(12345)  # whatever the process did before
        torch.manual_seed(12345)
        run(config)
        return _csv_losses(tmp_path / name)[1], load_checkpoint(list_checkpoints(tmp_path / name / "ckpt")[0][1])

    a, sa = go("a", 3)
    b, sb = go("b", 3)
    c, _ = go("c", 4)
    assert a == b and len(a) == 4  # bit-identical losses
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert a != c  # another seed: another init, dropout and order
    with pytest.raises(ConfigError, match="train.seed"):
        build(_config(tmp_path, seed=-1))


# --------------------------------------------------------------------------- named losses


class TwoHead(torch.nn.Module):
    """Head a predicts the next character, head b the current one: two losses a batch."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(len(VOCAB), 16)
        self.head_a = torch.nn.Linear(16, len(VOCAB))
        self.head_b = torch.nn.Linear(16, len(VOCAB))

    def forward(self, tokens, targets):
        h = self.emb(tokens)
        return {
            "loss_a": F.cross_entropy(self.head_a(h).flatten(0, 1), targets.flatten()),
            "loss_b": F.cross_entropy(self.head_b(h).flatten(0, 1), tokens.flatten()),
        }


def _two_head_trainer(steps, log_dir=None, **kw):
    model = TwoHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    kw.setdefault("eval_every", 2)
    kw.setdefault("batch_size", 4)
    return Trainer(model, opt, TRAIN, VAL, max_steps=steps, log_every=2, progress=False, log_dir=log_dir, **kw)


def test_named_losses_are_weighted_logged_and_evaluated(tmp_path):
    t = _two_head_trainer(4, tmp_path, loss_weights={"loss_b": 0.5}, accumulate_grad_batches=2)
    out = t.fit()
    rows = [r for r in _csv_rows(tmp_path) if r["loss"]]
    assert len(rows) == 4
    for r in rows:  # the total is the weighted sum (missing weight = 1)
        assert float(r["loss"]) == pytest.approx(float(r["loss_a"]) + 0.5 * float(r["loss_b"]), rel=1e-5)
    evals = [r for r in _csv_rows(tmp_path) if r["val_loss"]]
    assert len(evals) == 2
    for r in evals:
        assert float(r["val_loss"]) == pytest.approx(float(r["val_loss_a"]) + 0.5 * float(r["val_loss_b"]), rel=1e-5)
    assert out["val_loss"] == pytest.approx(t.evals[-1]["val_loss_a"] + 0.5 * t.evals[-1]["val_loss_b"], rel=1e-5)
    # the weight matters: the optimiser minimised a different objective
    t1 = _two_head_trainer(4, loss_weights={"loss_b": 0.0})
    t1.fit()
    assert [h["loss_a"] for h in t1.history] != [h["loss_a"] for h in t.history]
    assert [h["loss"] for h in t1.history] == pytest.approx([h["loss_a"] for h in t1.history])
    # early stopping can watch one component
    es = _two_head_trainer(20, early_stopping=dict(NEVER_BETTER, monitor="val_loss_b", patience=1))
    assert es.fit()["step"] == 4


def test_named_losses_resume_exactly_with_their_columns(tmp_path):
    kw = dict(loss_weights={"loss_b": 0.5}, eval_every=2, eval_batches=1, checkpoint_every=2)
    full = _two_head_trainer(6, tmp_path / "full", checkpoint_dir=tmp_path / "full" / "ckpt", **kw)
    full.fit()
    _two_head_trainer(4, tmp_path / "cut", checkpoint_dir=tmp_path / "cut" / "ckpt", **kw).fit()
    resumed = _two_head_trainer(6, tmp_path / "cut", checkpoint_dir=tmp_path / "cut" / "ckpt", **kw)
    resumed.fit()
    cols = ("step", "loss", "loss_a", "loss_b", "val_loss", "val_loss_a", "val_loss_b")
    assert [[r[c] for c in cols] for r in _csv_rows(tmp_path / "cut")] == [
        [r[c] for c in cols] for r in _csv_rows(tmp_path / "full")
    ]


class TwoHeadWithOutput(TwoHead):
    def forward(self, tokens, targets):
        return self.emb(tokens), super().forward(tokens, targets)  # (output, dict of losses)


def test_named_losses_from_an_output_tuple():
    model = TwoHeadWithOutput()
    t = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        TRAIN,
        max_steps=2,
        batch_size=4,
        log_every=1,
        eval_every=None,
        progress=False,
    )
    t.fit()
    assert t.history[0]["loss"] == pytest.approx(t.history[0]["loss_a"] + t.history[0]["loss_b"], rel=1e-5)


def test_named_losses_bad_weights_are_clear_errors():
    with pytest.raises(ValueError, match=r"loss_weights has key\(s\) \['loss_c'\].*\['loss_a', 'loss_b'\]"):
        _two_head_trainer(2, loss_weights={"loss_a": 1.0, "loss_c": 2.0}).fit()
    with pytest.raises(TypeError, match="single Tensor"):
        make_trainer(2, loss_weights={"loss_a": 1.0}).fit()
    with pytest.raises(ValueError, match="finite number"):
        _two_head_trainer(2, loss_weights={"loss_a": float("nan")})
    bad = _two_head_trainer(2, loss_fn=lambda m, b: {"loss": m(*b)["loss_a"]})
    with pytest.raises(ValueError, match="clash with metrics columns"):
        bad.fit()


# --------------------------------------------------------------------------- MLflow


def test_mlflow_missing_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r"pip install 'accelops\[mlflow\]'"):
        make_trainer(2, log_dir=tmp_path, mlflow=True)
    from accelops.cli import main

    path = tmp_path / "run.json"
    path.write_text(json.dumps(_config(tmp_path, max_steps=2)))
    with pytest.raises(ImportError, match=r"accelops\[mlflow\]"):
        main(["train", str(path), "--mlflow"])


def test_mlflow_logs_params_metrics_and_checkpoint(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'accelops[mlflow]')")
    from mlflow.tracking import MlflowClient

    t = make_trainer(
        4,
        log_dir=tmp_path,
        checkpoint_dir=tmp_path / "ckpt",
        eval_every=2,
        eval_batches=1,
        mlflow={"experiment": "tiny", "run_name": "first"},
    )
    t.fit()
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    exp = client.get_experiment_by_name("tiny")
    (run_,) = client.search_runs([exp.experiment_id])
    assert run_.info.run_name == "first" and run_.info.status == "FINISHED"
    assert run_.data.params["batch_size"] == "4" and run_.data.params["max_steps"] == "4"
    loss = client.get_metric_history(run_.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4]
    assert sorted(m.value for m in loss) == sorted(losses(t))
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val_loss")] == [2, 4]
    assert run_.data.tags["accelops.checkpoint"] == os.path.abspath(list_checkpoints(tmp_path / "ckpt")[0][1])
    # resumed: the same MLflow run goes on (its id is in the checkpoint)
    more = make_trainer(
        6,
        log_dir=tmp_path,
        checkpoint_dir=tmp_path / "ckpt",
        eval_every=2,
        eval_batches=1,
        mlflow={"experiment": "tiny", "run_name": "first"},
    )
    more.fit()
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run_.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert again.data.tags["accelops.checkpoint"].endswith("step-00000006.ckpt")

    # the CLI: --mlflow, the config as params, early stopping's reason as a tag
    from accelops.cli import main

    os.makedirs(tmp_path / "cli")
    cfg = _config(
        tmp_path / "cli", max_steps=40, eval_every=2, checkpoint_every=2, early_stopping=dict(NEVER_BETTER, patience=1)
    )
    path = tmp_path / "cli" / "run.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path), "--mlflow"]) == 0
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "cli" / "log" / "mlflow.db"))
    (cli_run,) = client.search_runs([client.get_experiment_by_name("accelops").experiment_id])
    assert cli_run.data.params["config.train.max_steps"] == "40" and cli_run.data.params["config.model.dim"] == "32"
    assert cli_run.data.tags["accelops.stop_reason"].startswith("early stopping at step 4")
    with pytest.raises(ValueError, match="needs log_dir"):
        make_trainer(2, mlflow=True)
