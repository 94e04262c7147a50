import json

import pytest

from resist_mpi.cli.config import Config, ConfigError, parse_config, validate
from resist_mpi.cli.trainer import lr_at


def test_flags_map_to_fields_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("local-steps: 7\nmodel: preact_resnet34\nwidth: 8\n")
    cfg = parse_config(["--config", str(path), "--width", "16", "--optimizer-state", "keep_shared", "--overlap"])
    assert (cfg.local_steps, cfg.model, cfg.width, cfg.optimizer_state, cfg.overlap) == \
        (7, "preact_resnet34", 16, "keep_shared", True)
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps({"min_depth": 3, "epochs": 2}))
    cfg = parse_config(["--config", str(jpath)])
    assert (cfg.min_depth, cfg.epochs) == (3, 2)


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nope"], "unknown model"),
    (["--strategy", "sgd"], "invalid choice"),
    (["--epochs", "0"], "at least 1"),
    (["--min-depth", "-2"], ">= 0"),
    (["--lr", "-1"], "positive"),
    (["--partition-stages", "x"], "stage numbers"),
    (["--warmup-epochs", "5", "--epochs", "5"], "leaves no ResIST"),
    (["--warmup-epochs", "1", "--strategy", "local_sgd"], "resist only"),
    (["--batch-size", "abc"], "invalid int"),
    (["--keep-shared-momentum"], "is now --optimizer-state keep_shared"),
    (["--outer-optimizer", "adam"], "invalid choice"),
    (["--outer-optimizer", "nesterov", "--outer-momentum", "1"], "outer-momentum in"),
    (["--strategy", "data_parallel", "--overlap"], "apply to resist and local_sgd"),
    (["--overlap-steps", "2"], r"--overlap-steps 2: needs --overlap and a value from 1 to --local-steps - 1"),
    (["--overlap", "--overlap-steps", "5", "--local-steps", "5"], r"from 1 to --local-steps - 1 \(4\)"),
    (["--overlap", "--overlap-steps", "-1"], "--overlap-steps -1: needs"),
    (["--momentum", "1.5"], r"--momentum must be in \[0, 1\), got 1.5"),
    (["--seed", str(2 ** 64)], "--seed must fit in 64 bits"),
])
def test_bad_settings_one_line(argv, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        validate(parse_config(argv))
    assert "\n" not in str(e.value)


def test_overlap_lands_half_a_round_late_by_default():
    from resist_mpi.cli.trainer import overlap_steps
    steps = {tuple(argv): overlap_steps(validate(parse_config(list(argv)))) for argv in [
        (), ("--overlap", "--local-steps", "10"), ("--overlap", "--local-steps", "7"), ("--overlap", "--local-steps", "1"),
        ("--overlap", "--overlap-steps", "0"), ("--overlap", "--local-steps", "10", "--overlap-steps", "9")]}
    assert list(steps.values()) == [None, 5, 3, None, None, 9]


def test_bad_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lokal_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_config(["--config", str(p)])
    p.write_text("keep_shared_momentum: true\n")
    with pytest.raises(ConfigError, match="is now optimizer_state: keep_shared"):
        parse_config(["--config", str(p)])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(["--config", str(tmp_path / "none.yaml")])


def test_lr_schedules():
    from resist_mpi.cli.trainer import lr_factor
    cfg = Config(lr=0.1, epochs=100)
    assert all(lr_at(cfg, e) == cfg.lr * lr_factor(cfg, e) for e in (0, 10, 50, 80))
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 49.9) == 0.1
    assert lr_at(cfg, 50) == pytest.approx(0.01) and lr_at(cfg, 75) == pytest.approx(0.001)
    cfg.schedule = "cosine"
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 50) == pytest.approx(0.05)
    assert lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)


def test_cifar100_recipe_gives_each_rank_the_reference_steps():
    """configs/cifar100_resnet101.yaml: the reference's 40 epochs of full passes per worker (391
    steps of 128) are 15,640 steps; here 4 ranks share an epoch (98 steps each), 160 epochs."""
    import math
    import os

    from resist_mpi.cli.config import parse_config, validate
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = validate(parse_config(["--config", os.path.join(root, "configs", "cifar100_resnet101.yaml")]))
    assert (cfg.model, cfg.width, cfg.dataset, cfg.local_steps, cfg.batch_size, cfg.lr, cfg.momentum,
            cfg.weight_decay) == ("preact_resnet101", 64, "cifar100", 50, 128, 0.03, 0.9, 5e-4)
    steps_per_rank = cfg.epochs * math.ceil(math.ceil(50_000 / 4) / cfg.batch_size)
    assert abs(steps_per_rank - 40 * 391) / (40 * 391) < 0.005


def test_check_prints_one_line_about_this_installation(capsys):
    from resist_mpi.tools import check
    assert check.main([]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("resist_mpi ") and "torch " in line and "--backend auto: " in line
    r = check.report()
    assert r["auto_backend"] in ("mpi", "torch", "horovod") and r["gpus"] >= 0
