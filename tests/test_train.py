"""Training pipeline on real crops: the pool, a few steps that lower the loss, exact resume, torchrun, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_mfr.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pool(data_dir, tmp_path_factory):
    """12 celeba_test train identities x 4 faces, aligned, compressed, with teacher templates and 20 mask layers."""
    pytest.importorskip("face_recognition_models", reason="the teacher layout is read from dlib's file")
    from edge_mfr.train.data import prepare_pool

    pool = prepare_pool(data_dir, sources=("celeba_test",), max_identities=12, max_per_identity=4, mask_count=20,
                        progress=False)
    return pool.save(tmp_path_factory.mktemp("pool") / "pool.npz")


def tiny_config(pool_path, out_dir, **changes):
    from edge_mfr.train.config import TrainConfig

    values = dict(name="tiny", arch="mfn_s", pool=str(pool_path), out_dir=str(out_dir), steps=12, batch_size=16,
                  lr=2e-3, head_lr=2e-3, warmup_steps=2, eval_every=6, holdout_identity_fraction=0.2, threads=1,
                  progress=False, arc_weight=1.0, mse_weight=100.0, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def losses_of(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "history.json").read_text())["history"]
    return [h["loss"] for h in history]


def test_pool_holds_aligned_crops_templates_and_mask_layers(tiny_pool):
    from edge_mfr.train.data import POOL_FORMAT, TrainingPool

    pool = TrainingPool.load(tiny_pool)
    n = len(pool)
    assert 44 <= n <= 48 and len(pool.identities) == 12 and pool.has_templates  # a face MTCNN misses is skipped
    assert pool.meta["train_data"] == [{"name": "celeba_test", "split": "train"}]
    crops = pool.decode()
    assert crops.shape == (n, 112, 112, 3) and crops.dtype == np.uint8
    norms = np.linalg.norm(pool.teacher, axis=1)
    assert np.all((norms > 1.2) & (norms < 1.8))  # raw dlib descriptors: norm about 1.47
    unit = pool.teacher / norms[:, None]
    flipped = pool.teacher_flipped / np.linalg.norm(pool.teacher_flipped, axis=1, keepdims=True)
    assert np.sum(unit * flipped, axis=1).min() > 0.85  # a face and its mirror image: the same person
    same = pool.labels[:, None] == pool.labels[None, :]
    scores = unit @ unit.T
    assert scores[same & ~np.eye(n, dtype=bool)].mean() > scores[~same].mean() + 0.05
    assert pool.mask_alpha.shape == (20, 112, 112) and pool.mask_alpha.max() == 255
    assert set(pool.mask_types[:10]) == {"surgical", "n95", "kn95", "cloth", "nist_a", "nist_b", "nist_c", "nist_d",
                                         "nist_e", "nist_f"}
    assert str(np.load(tiny_pool)["format"]) == POOL_FORMAT


def test_missing_and_corrupt_training_images_are_skipped_and_counted(data_dir, tmp_path):
    from edge_mfr.train.data import prepare_pool

    root = tmp_path / "data" / "celeba_test"
    (root / "images").mkdir(parents=True)
    lines = [line.split() for line in (data_dir / "celeba_test" / "identities.txt").read_text().splitlines()]
    real = [parts for parts in lines if parts and parts[2] == "train"][:3]
    for name, _, _ in real:
        shutil.copy(data_dir / "celeba_test" / "images" / name, root / "images" / name)
    (root / "images" / "broken.webp").write_bytes(b"RIFF\x00\x00not an image")
    listing = [" ".join(parts) for parts in real] + ["broken.webp 1 train", "gone.webp 1 train", "calib.webp 7 calib"]
    (root / "identities.txt").write_text("\n".join(listing) + "\n")
    pool = prepare_pool(tmp_path / "data", sources=("celeba_test",), mask_count=2, with_templates=False, progress=False)
    assert len(pool) == 3
    skipped = pool.meta["skipped"]
    assert (skipped["missing"], skipped["unreadable"]) == (1, 1)
    assert not any("calib" in f for f in pool.files)  # the calib split never enters a training pool


def test_evaluation_data_is_refused_as_a_training_source(data_dir):
    from edge_mfr.train.data import source_items

    for source in ("lfw", "rmfd_sample"):
        with pytest.raises(InputError, match="not training data"):
            source_items(data_dir, source)


def test_a_few_steps_lower_the_loss_and_resume_exactly(tiny_pool, tmp_path):
    from edge_mfr.train.trainer import fit, load_train_checkpoint

    full = fit(tiny_config(tiny_pool, tmp_path / "full"), log=lambda _: None)
    losses = losses_of(full)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    best = load_train_checkpoint(full / "best.pt")
    assert set(best["metrics"]) >= {"tpr_uu", "tpr_um", "tpr_mm"}
    assert (full / "loss_curve.png").stat().st_size > 1000

    at_start = fit(tiny_config(tiny_pool, tmp_path / "zero", stop_after_steps=0), log=lambda _: None)
    assert losses_of(at_start) == [] and load_train_checkpoint(at_start / "last.pt")["state"]["step"] == 0

    interrupted = tiny_config(tiny_pool, tmp_path / "split", stop_after_steps=5)
    fit(interrupted, log=lambda _: None)
    assert len(losses_of(tmp_path / "split" / "tiny")) == 5
    resumed = fit(dataclasses.replace(interrupted, stop_after_steps=None), resume=True, log=lambda _: None)
    assert losses_of(resumed) == losses  # bit for bit: model, optimizer, schedule and data order all restored


def test_the_network_where_a_run_stopped_exports_from_last_pt(tiny_pool, tmp_path):
    """A run stopped by its budget leaves its latest network only in last.pt; export takes it."""
    from edge_mfr.models.package import load_package
    from edge_mfr.train.export import export_package
    from edge_mfr.train.trainer import fit, load_train_checkpoint, weights_record

    run = fit(tiny_config(tiny_pool, tmp_path / "stopped", stop_after_steps=5), log=lambda _: None)
    assert not (run / "final.pt").exists()
    last = load_train_checkpoint(run / "last.pt")
    record = weights_record(last, run / "last.pt")
    assert record["step"] == 5 and set(record["network"]) and not any(k.startswith("network.") for k in record["network"])
    package = export_package(run / "last.pt", tmp_path / "stopped.onnx", name="stopped")
    assert load_package(package.onnx_path).name == "stopped"
    del last["pool_meta"]
    with pytest.raises(InputError, match="without the pool's metadata"):
        weights_record(last, run / "last.pt")


def test_the_teacher_network_at_112_px_trains_and_exports_at_that_size(tiny_pool, tmp_path):
    """A compact student: the teacher's network fed the pool's 112 px crops as they are. Its package declares
    112 px and the chip template at that size, and, four small steps from the teacher, its embeddings of real
    faces still point towards the teacher's 150 px templates of the same faces."""
    from edge_mfr.embed import FaceEmbedder
    from edge_mfr.train.data import TrainingPool, chip_template
    from edge_mfr.train.export import export_package
    from edge_mfr.train.trainer import fit

    run = fit(tiny_config(tiny_pool, tmp_path / "runs", arch="dlib_resnet", init="teacher", input_size=112, steps=4,
                          eval_every=4, batch_size=8, lr=1e-5, arc_weight=0.0), log=lambda _: None)
    package = export_package(run / "last.pt", tmp_path / "dlib112.onnx", name="dlib112")
    assert package.input_size == (112, 112) and package.architecture == "dlib_resnet29_metric"
    assert np.allclose(package.template, chip_template(112))
    pool = TrainingPool.load(tiny_pool)
    crops = pool.decode()  # BGR chips already at the package's template and size
    batch = (crops[..., ::-1].astype(np.float32) - np.float32(package.mean)) / np.float32(package.std)
    embeddings = FaceEmbedder(package, threads=1).embed_batch(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    teacher = pool.teacher / np.linalg.norm(pool.teacher, axis=1, keepdims=True)
    similarity = embeddings @ teacher.T
    same = pool.labels[:, None] == pool.labels[None, :]
    assert similarity[same].mean() > similarity[~same].mean()
    assert np.mean(similarity.argmax(1) == np.arange(len(pool))) > 0.3  # its own face's template, of 47 (0.45 seen)


def test_the_teacher_network_without_residual_units_keeps_the_teachers_weights(tiny_pool, tmp_path):
    """A compact student that keeps 150 px and loses depth: the units left out cost their multiply-adds, the
    others start with the teacher's weights, and a downsampling unit cannot be left out."""
    from edge_mfr.models.complexity import onnx_complexity
    from edge_mfr.train.config import TrainConfig
    from edge_mfr.train.export import export_package
    from edge_mfr.train.teacher import teacher_onnx_path
    from edge_mfr.train.trainer import fit, load_train_checkpoint

    dropped = (1, 5, 8, 9, 11, 12)
    run = fit(tiny_config(tiny_pool, tmp_path / "runs", arch="dlib_resnet", init="teacher", input_size=150,
                          drop_units=dropped, steps=2, eval_every=2, batch_size=8, lr=1e-5, arc_weight=0.0),
              log=lambda _: None)
    weights = load_train_checkpoint(run / "best.pt")["network"]
    assert not any(key.startswith(f"units.{unit}.") for unit in dropped for key in weights)
    package = export_package(run / "last.pt", tmp_path / "dlib17.onnx", name="dlib17")
    assert package.architecture == "dlib_resnet17_metric" and package.input_size == (150, 150)
    student, teacher = onnx_complexity(package.onnx_path).gmacs, onnx_complexity(teacher_onnx_path()).gmacs
    assert 0.5 < student / teacher < 0.6  # six of the fourteen units, 0.151 of 0.271 GMACs
    assert TrainConfig(name="t", arch="dlib_resnet", drop_units=[12, 1, 12]).drop_units == (1, 12)
    with pytest.raises(InputError, match="unit 3 changes its input's shape"):
        fit(tiny_config(tiny_pool, tmp_path / "bad", arch="dlib_resnet", init="teacher", input_size=150,
                        drop_units=(3,), arc_weight=0.0), log=lambda _: None)
    with pytest.raises(InputError, match="drop_units needs arch='dlib_resnet'"):
        tiny_config(tiny_pool, tmp_path, drop_units=(1,))
    assert tiny_config(tiny_pool, tmp_path, arch="dlib_resnet").with_overrides(
        ["drop_units=8,12"]).drop_units == (8, 12)


def test_a_masked_route_network_is_selected_on_a_simulated_masked_route(tiny_pool, tmp_path):
    """selection="masked_route": best.pt is the step whose masked route of an unlock simulated on the hold-out
    (masked probes against the teacher's clean and the network's masked templates) is best, whatever its own
    clean faces do; a student of another embedding size cannot meet the teacher's templates."""
    from edge_mfr.train.trainer import fit, load_train_checkpoint, selection_score

    run = fit(tiny_config(tiny_pool, tmp_path / "mr", arch="dlib_resnet", init="teacher", input_size=112, steps=4,
                          eval_every=2, batch_size=8, lr=1e-4, head_lr=1e-2, mse_weight=100.0, flip=False,
                          selection="masked_route"), log=lambda _: None)
    evals = json.loads((run / "history.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(0 <= e["tpr_masked_route"] <= 1 for e in evals)
    best = load_train_checkpoint(run / "best.pt")
    assert best["metrics"]["tpr_masked_route"] == max(e["tpr_masked_route"] for e in evals)
    assert best["metrics"]["step"] == min(e["step"] for e in evals if e["tpr_masked_route"] == best["metrics"]["tpr_masked_route"])

    drifted = {"tpr_uu": 0.5, "tpr_um": 0.4, "tpr_mm": 0.3, "tpr_masked_route": 0.45}
    student, masked_route = (tiny_config(tiny_pool, tmp_path, selection=s) for s in ("student", "masked_route"))
    assert selection_score(drifted, student, start_uu=0.7) is None  # the student guard: clean faces fell
    assert selection_score(drifted, masked_route, start_uu=0.7) == 0.45  # the masked route never sees them
    with pytest.raises(InputError, match="selection='masked_route'.*64-d"):
        fit(tiny_config(tiny_pool, tmp_path / "p", embedding_size=64, teacher_projection=True, selection="masked_route"),
            log=lambda _: None)
    with pytest.raises(InputError, match="selection must be one of"):
        tiny_config(tiny_pool, tmp_path, selection="loss")


def test_the_simulated_masked_route_scores_probes_by_their_best_template_of_each_identity():
    from edge_mfr.train.trainer import masked_route_tpr

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])  # identity 3 has too few faces to enroll and probe
    people = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    clean = people[labels]
    assert masked_route_tpr(clean, clean, labels) == 1.0  # probes equal their owners' templates
    # a masked-route network in another space entirely: its probes still meet its own masked templates
    rotated = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0]
    assert masked_route_tpr(clean, clean @ rotated, labels) == 1.0
    # probes that point at another identity's templates are impostors the threshold must stop
    wrong = people[(labels + 1) % 4]
    assert masked_route_tpr(clean, torch.where((torch.arange(11) % 3 == 2)[:, None], wrong, clean), labels) == 0.0


def test_resume_refuses_a_checkpoint_of_another_config(tiny_pool, tmp_path):
    from edge_mfr.train.trainer import fit

    fit(tiny_config(tiny_pool, tmp_path, steps=2, eval_every=2), log=lambda _: None)
    with pytest.raises(InputError, match="another config"):
        fit(tiny_config(tiny_pool, tmp_path, steps=2, eval_every=2, lr=1e-3), resume=True, log=lambda _: None)


def test_bad_configs_are_refused_with_clear_errors(tiny_pool, tmp_path):
    from edge_mfr.train.config import TrainConfig, load_config
    from edge_mfr.train.trainer import fit

    with pytest.raises(InputError, match="unknown config keys"):
        TrainConfig.from_dict({"name": "x", "learning_rate": 0.1})
    config_file = tmp_path / "typo.py"
    config_file.write_text("from edge_mfr.train.config import TrainConfig\nconfig = TrainConfig(name='t', lamda=3)\n")
    with pytest.raises(InputError, match="lamda"):
        load_config(str(config_file))
    with pytest.raises(InputError, match="128-d"):  # teacher templates are 128-d, the student's 64-d
        fit(tiny_config(tiny_pool, tmp_path, embedding_size=64), log=lambda _: None)
    with pytest.raises(InputError, match="96x96 input"):
        fit(tiny_config(tiny_pool, tmp_path, input_size=96), log=lambda _: None)
    with pytest.raises(InputError, match="arch must be"):
        tiny_config(tiny_pool, tmp_path, arch="resnet100")
    with pytest.raises(InputError, match="masked_view_alignment takes 8 numbers"):
        tiny_config(tiny_pool, tmp_path, masked_view_alignment=(0.0, 0.0, 0.03, 0.5))
    with pytest.raises(InputError, match="masked_view_alignment takes 8 numbers"):
        tiny_config(tiny_pool, tmp_path, masked_view_alignment=(0, 0, 0, 0, 0.03, -0.03, 0.08, 3.8))


def test_masked_views_move_as_a_redetection_moves_them_and_the_hold_out_stays_put(tiny_pool):
    """Only masked views are moved; the move is the similarity the config's numbers describe (checked against
    OpenCV's warp of the same chips); the hold-out's draw leaves them where the clean points put them."""
    import math

    import cv2
    import torch

    from edge_mfr.train.augment import BatchAugment, step_generator
    from edge_mfr.train.data import TrainingPool

    pool = TrainingPool.load(tiny_pool)
    chips = pool.decode(np.arange(8))
    side = chips.shape[1]
    view = (0.03, -0.02, 0.08, 5.0)
    augment = BatchAugment(pool.mask_colour, pool.mask_alpha, pool.mask_lit, 0.5, 0.04, False, torch.device("cpu"),
                           masked_view_alignment=view + (0.0, 0.0, 0.0, 0.0))
    choice = augment.draw(8, step_generator(0, 0))
    choice["masked"] = torch.tensor([True, False] * 4)
    moved = augment.apply(torch.from_numpy(chips), choice).numpy()
    still = augment.apply(torch.from_numpy(chips), {k: v for k, v in choice.items() if k != "view"}).numpy()
    assert np.array_equal(moved[1::2], chips[1::2].astype(np.float32))  # clean views untouched
    scale, angle = math.exp(view[2]), math.radians(view[3])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.full(2, side / 2 - 0.5)  # OpenCV's pixel centres
    shift = centre + np.array(view[:2]) * side - rotation @ centre
    matrix = np.hstack([rotation, shift[:, None]])
    for masked_chip, moved_chip in zip(still[::2], moved[::2]):
        expected = cv2.warpAffine(masked_chip, matrix, (side, side), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
        assert np.abs(moved_chip - expected)[8:-8, 8:-8].mean() < 0.5  # ours is rounded to 8 bits
        assert np.abs(moved_chip - masked_chip)[8:-8, 8:-8].mean() > 5.0
    assert "view" not in augment.draw(8, step_generator(0, 0), training=False)


def test_scene_changes_and_blends_reach_the_teacher_view_and_leave_older_draws_alone(tiny_pool):
    """With scene changes and blends, the clean view (what the online teacher embeds) is the student's view
    without its mask: blended and relit the same, moved by the same geometry. Runs without them draw exactly
    what they drew before, and the hold-out draws neither."""
    import torch

    from edge_mfr.train.augment import BatchAugment, step_generator
    from edge_mfr.train.data import TrainingPool

    pool = TrainingPool.load(tiny_pool)
    chips = torch.from_numpy(pool.decode(np.arange(8)))
    layers = (pool.mask_colour, pool.mask_alpha, pool.mask_lit, 0.5, 0.04, True, torch.device("cpu"))
    plain = BatchAugment(*layers).draw(8, step_generator(0, 5))
    augment = BatchAugment(*layers, scene=True, mix_probability=1.0)
    choice = augment.draw(8, step_generator(0, 5))
    assert all(torch.equal(plain[k], choice[k]) for k in plain)
    assert set(choice) - set(plain) == {"scene", "grey", "mix_partner", "mix_weight"}
    assert set(augment.draw(8, step_generator(0, 5), training=False)) == set(plain)
    choice["masked"] = torch.tensor([True, False] * 4)
    with pytest.raises(ValueError, match="partner"):
        augment.views(chips, choice)
    clean, student = augment.views(chips, choice, chips[choice["mix_partner"]])
    assert torch.equal(clean[1::2], student[1::2])  # unmasked views: the student sees what the teacher sees
    differs = (clean[::2] - student[::2]).abs().amax(dim=-1)
    rows = differs.shape[1]
    assert bool((differs[:, :rows // 4] <= 1.0).all())  # a mask stays on the lower face (masked views are 8-bit)
    assert bool((differs > 20).flatten(1).any(dim=1).all())
    assert (clean - chips.float()).abs().mean() > 10  # every view moved, relit or blended
    assert float(clean.min()) >= 0 and float(clean.max()) <= 255


def test_a_student_learns_from_the_teacher_run_on_every_view_and_resumes_exactly(tiny_pool, tmp_path):
    from edge_mfr.train.trainer import fit

    online = dict(arc_weight=0.0, kd_target="standardized", teacher_views="online", scene_augment=True,
                  mix_probability=0.5, steps=8, eval_every=4)
    full = fit(tiny_config(tiny_pool, tmp_path / "full", **online), log=lambda _: None)
    losses = losses_of(full)
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])
    interrupted = tiny_config(tiny_pool, tmp_path / "split", stop_after_steps=3, **online)
    fit(interrupted, log=lambda _: None)
    resumed = fit(dataclasses.replace(interrupted, stop_after_steps=None), resume=True, log=lambda _: None)
    assert losses_of(resumed) == losses


def test_augmentations_the_cached_templates_did_not_see_are_refused(tiny_pool, tmp_path):
    with pytest.raises(InputError, match="need teacher_views='online'"):
        tiny_config(tiny_pool, tmp_path, scene_augment=True)
    with pytest.raises(InputError, match="need teacher_views='online'"):
        tiny_config(tiny_pool, tmp_path, mix_probability=0.3)
    with pytest.raises(InputError, match="no identity"):
        tiny_config(tiny_pool, tmp_path, teacher_views="online", mix_probability=0.3)
    with pytest.raises(InputError, match="computes KD targets"):
        tiny_config(tiny_pool, tmp_path, teacher_views="online", mse_weight=0.0)
    with pytest.raises(InputError, match="teacher_views must be"):
        tiny_config(tiny_pool, tmp_path, teacher_views="live")


def test_fields_added_later_keep_the_hash_of_runs_from_before_at_their_default():
    """A checkpoint written before `kd_target` and `holdout_seed` existed still resumes: at their defaults they
    are left out of the hash; set, they change it. The hold-out follows `seed` unless `holdout_seed` is set."""
    from edge_mfr.train.config import TrainConfig

    from edge_mfr.train.config import LATER_FIELDS

    base = TrainConfig(name="x", seed=5)
    before = {k: v for k, v in base.to_dict().items() if k not in LATER_FIELDS}
    assert TrainConfig.from_dict(before).result_hash() == base.result_hash()
    assert base.with_overrides(["holdout_seed=5"]).result_hash() != base.result_hash()
    assert base.with_overrides(["kd_target=standardized"]).result_hash() != base.result_hash()
    realigned = base.with_overrides(["masked_view_alignment=0,0,0.03,0.5,0.03,0.03,0.08,3.8"])
    assert realigned.masked_view_alignment == (0.0, 0.0, 0.03, 0.5, 0.03, 0.03, 0.08, 3.8)
    assert realigned.result_hash() != base.result_hash()
    assert base.split_seed == 5 and base.with_overrides(["holdout_seed=0"]).split_seed == 0


def test_a_student_of_another_size_learns_through_a_dropped_projection(tiny_pool, tmp_path):
    from edge_mfr.train.trainer import build_network_from_record, fit, load_train_checkpoint

    run = fit(tiny_config(tiny_pool, tmp_path, embedding_size=64, teacher_projection=True, steps=2, eval_every=2),
              log=lambda _: None)
    network = build_network_from_record(load_train_checkpoint(run / "best.pt")).eval()
    with torch.no_grad():
        assert network(torch.zeros(2, 3, 112, 112)).shape == (2, 64)  # the projection is not part of the model


def test_a_standardized_target_is_fitted_on_the_training_faces_only(tiny_pool, tmp_path):
    from edge_mfr.train.data import TrainingPool
    from edge_mfr.train.trainer import fit, kd_standardizer, split_holdout

    pool = TrainingPool.load(tiny_pool)
    train_rows, held_rows = split_holdout(pool, 0.2, 3)
    teacher = torch.from_numpy(pool.teacher)
    standardize = kd_standardizer(tiny_config(tiny_pool, tmp_path, kd_target="standardized"), teacher, train_rows)
    standardized, mirrored = standardize(teacher), standardize(torch.from_numpy(pool.teacher_flipped))
    fitted = standardized[torch.from_numpy(train_rows)].double()
    assert torch.allclose(fitted.mean(dim=0), torch.zeros(1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(fitted.std(dim=0), torch.ones(1, dtype=torch.float64), atol=1e-4)
    # the hold-out faces are transformed with the training faces' statistics, not their own
    held = standardized[torch.from_numpy(held_rows)].double()
    assert held.mean(dim=0).abs().max() > 1e-3
    assert mirrored.shape == standardized.shape and not torch.equal(mirrored, standardized)

    run = fit(tiny_config(tiny_pool, tmp_path, kd_target="standardized", arc_weight=0.0), log=lambda _: None)
    losses = losses_of(run)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_a_standardized_target_is_refused_where_the_teachers_space_is_needed(tiny_pool, tmp_path):
    with pytest.raises(InputError, match="kd_target must be"):
        tiny_config(tiny_pool, tmp_path, kd_target="whitened")
    with pytest.raises(InputError, match="selection must be 'student'"):
        tiny_config(tiny_pool, tmp_path, kd_target="standardized", selection="masked_route")


def test_cli_exits_2_on_a_bad_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edge_mfr.train", "fit", "no_such_recipe"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "no training config" in result.stderr and "Traceback" not in result.stderr


def test_torchrun_two_processes_match_one_and_resume(tiny_pool, tmp_path):
    """DDP (gloo) over 2 processes computes what one process does, up to floating-point order; an interrupted
    2-process run resumes to the same losses. The teacher-initialised dlib network: it has no batch norm, whose
    statistics PyTorch syncs across processes on CUDA only."""
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    from edge_mfr.train.trainer import fit

    dlib = dict(arch="dlib_resnet", init="teacher", input_size=150, steps=5, eval_every=5, batch_size=8, lr=1e-5,
                head_lr=1e-2)
    single = fit(tiny_config(tiny_pool, tmp_path / "one", **dlib), log=lambda _: None)
    config_file = tmp_path / "tiny_ddp.py"
    config = tiny_config(tiny_pool, tmp_path / "two", **dlib)
    config_file.write_text("from edge_mfr.train.config import TrainConfig\nconfig = TrainConfig.from_dict("
                           f"{config.to_dict()!r})\n")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "edge_mfr.train", "fit", str(config_file)]
    first = subprocess.run(command + ["stop_after_steps=3"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    np.testing.assert_allclose(losses_of(tmp_path / "two" / "tiny"), losses_of(single), rtol=2e-4)


def test_a_packed_teacher_delta_reads_back_as_the_network(tiny_pool, tmp_path):
    """run_all packs teacher-initialised networks as float16 differences from the teacher; reading one back gives
    the trained weights to float16 precision of the difference."""
    from edge_mfr.train.data import TrainingPool
    from edge_mfr.train.teacher import bundled_teacher_network, teacher_delta
    from edge_mfr.train.trainer import CHECKPOINT_FORMAT, load_train_checkpoint

    meta = TrainingPool.load(tiny_pool).meta
    trained = bundled_teacher_network(meta["teacher_layout"], meta["teacher_fingerprint"]).state_dict()
    rng = torch.Generator().manual_seed(0)
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=rng) for k, v in trained.items()}
    config = tiny_config(tiny_pool, tmp_path, arch="dlib_resnet", init="teacher", input_size=150).to_dict()
    record = {"format": CHECKPOINT_FORMAT, "config": config, "network": trained, "pool_meta": meta}
    torch.save(teacher_delta(record), tmp_path / "packed.pt")
    restored = load_train_checkpoint(tmp_path / "packed.pt")
    assert "network_delta_fp16" not in restored
    for name, value in trained.items():
        torch.testing.assert_close(restored["network"][name], value, atol=2e-6, rtol=0)


def test_two_fine_tunes_of_the_teacher_interpolate_into_a_measured_network(tiny_pool, tmp_path):
    """Weight interpolation (WiSE-FT / model soups): weight 0 is the first run exactly, measured on the hold-out
    as fit measured it; 0.5 is the midpoint of every weight and exports with a recipe naming both runs; networks
    that are not one network from one start, a weight outside [0, 1] and another pool are refused."""
    from edge_mfr.models.package import load_package
    from edge_mfr.train.export import export_package
    from edge_mfr.train.interpolate import interpolate_checkpoints
    from edge_mfr.train.trainer import fit, load_train_checkpoint

    common = dict(arch="dlib_resnet", init="teacher", input_size=112, steps=2, eval_every=2, batch_size=8, lr=1e-4,
                  head_warmup_steps=0)
    kd = fit(tiny_config(tiny_pool, tmp_path / "runs", name="kd", arc_weight=0.0, **common), log=lambda _: None)
    arc = fit(tiny_config(tiny_pool, tmp_path / "runs", name="arc", mse_weight=0.0, **common), log=lambda _: None)
    first, second = (load_train_checkpoint(run / "final.pt") for run in (kd, arc))

    same = interpolate_checkpoints([kd / "final.pt", arc / "final.pt"], [1.0, 0.0], tmp_path / "w0.pt", tiny_pool, threads=1)
    assert all(torch.equal(same["network"][k], first["network"][k]) for k in first["network"])
    assert same["metrics"] == pytest.approx({k: v for k, v in first["metrics"].items() if k != "step"}, abs=1e-6)

    mid = interpolate_checkpoints([kd / "final.pt", arc / "final.pt"], [0.5, 0.5], tmp_path / "soup.pt", tiny_pool, threads=1)
    key = "units.0.conv1.weight"
    assert not torch.equal(first["network"][key], second["network"][key])
    assert torch.allclose(mid["network"][key], (first["network"][key] + second["network"][key]) / 2)
    assert set(mid["metrics"]) >= {"tpr_uu", "tpr_um", "tpr_mm", "tpr_masked_route"}
    recipe = load_package(export_package(tmp_path / "soup.pt", tmp_path / "soup.onnx").onnx_path).meta["recipe"]
    assert recipe["method"].startswith("weight interpolation: 0.5 x kd (MSE") and " + 0.5 x arc (ElasticFace" in recipe["method"]
    assert [r["name"] for r in recipe["interpolation"]["from"]] == ["kd", "arc"]

    with pytest.raises(InputError, match="weights must be in"):
        interpolate_checkpoints([kd / "final.pt", arc / "final.pt"], [-0.5, 1.5], tmp_path / "x.pt", tiny_pool)
    cut = fit(tiny_config(tiny_pool, tmp_path / "runs", name="cut", arc_weight=0.0, drop_units=(12,), **common),
              log=lambda _: None)
    with pytest.raises(InputError, match="not one network from one start: drop_units"):
        interpolate_checkpoints([kd / "final.pt", cut / "final.pt"], [0.5, 0.5], tmp_path / "x.pt", tiny_pool)
    scratch = [fit(tiny_config(tiny_pool, tmp_path / "runs", name=n, steps=2, eval_every=2), log=lambda _: None)
               for n in ("s1", "s2")]
    reseeded = fit(tiny_config(tiny_pool, tmp_path / "runs", name="kd4", arc_weight=0.0, seed=4, **common),
                   log=lambda _: None)
    with pytest.raises(InputError, match="held out different identities"):
        interpolate_checkpoints([kd / "final.pt", reseeded / "final.pt"], [0.5, 0.5], tmp_path / "x.pt", tiny_pool)
    reseeded = fit(tiny_config(tiny_pool, tmp_path / "runs", name="kd4h", arc_weight=0.0, seed=4, holdout_seed=3,
                               **common), log=lambda _: None)
    assert not torch.equal(load_train_checkpoint(reseeded / "final.pt")["network"][key], first["network"][key])
    three = [str(run / "final.pt") for run in (kd, arc, reseeded)]
    cli = [sys.executable, "-m", "edge_mfr.train", "interpolate", *three, "--pool", str(tiny_pool), "--threads", "1"]
    done = subprocess.run(cli + ["--out", str(tmp_path / "soup3.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    soup = load_train_checkpoint(tmp_path / "soup3.pt")
    parts = [load_train_checkpoint(path)["network"][key] for path in three]
    assert torch.allclose(soup["network"][key], sum(parts) / 3, atol=1e-7)
    method = load_package(export_package(tmp_path / "soup3.pt", tmp_path / "soup3.onnx").onnx_path).meta["recipe"]["method"]
    assert method.count(" x ") == 3 and "kd4h (MSE" in method and "seed 4)" in method
    refused = subprocess.run(cli + ["--out", str(tmp_path / "x.pt"), "--weight", "0.5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "use --weights" in refused.stderr
    for weights, message in (("0.5,0.5", "one weight each"), ("0.5,x,0.5", "comma-separated numbers"),
                             ("0.6,0.6,-0.2", "sum to 1")):
        refused = subprocess.run(cli + ["--out", str(tmp_path / "x.pt"), "--weights", weights], capture_output=True,
                                 text=True)
        assert refused.returncode == 2 and message in refused.stderr, (weights, refused.stderr)
    with pytest.raises(InputError, match="trained from scratch"):
        interpolate_checkpoints([scratch[0] / "final.pt", scratch[1] / "final.pt"], [0.5, 0.5], tmp_path / "x.pt", tiny_pool)
    smaller = tmp_path / "smaller.npz"
    subprocess.run([sys.executable, "-m", "edge_mfr.train", "subset", str(tiny_pool), "--per-identity", "2",
                    "--out", str(smaller)], check=True, capture_output=True)
    with pytest.raises(InputError, match="pass the pool they were trained on"):
        interpolate_checkpoints([kd / "final.pt", arc / "final.pt"], [0.5, 0.5], tmp_path / "x.pt", smaller)
