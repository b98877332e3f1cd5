"""MTCNNDetector on real LFW / CelebA / RMFD photos, and its handling of unusual inputs."""
import json

import cv2
import numpy as np
import pytest

from edge_mfr.detect import Detection, MTCNNDetector
from edge_mfr.errors import InputError

LFW_FACES = ("Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Serena_Williams/Serena_Williams_0001.jpg",
             "Jennifer_Aniston/Jennifer_Aniston_0001.jpg")


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector()


@pytest.fixture(scope="module")
def lfw_images(lfw_dir) -> list[np.ndarray]:
    images = [cv2.imread(str(lfw_dir / "images" / name)) for name in LFW_FACES]
    assert all(image is not None for image in images)
    return images


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_plausible_face(face: Detection) -> None:
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert left_eye[0] < nose[0] < right_eye[0]
    x1, y1, x2, y2 = face.box
    assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
    assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))
    assert 0.5 < face.score <= 1.0


def test_one_face_with_landmarks_in_place_on_lfw(detector, lfw_images):
    for image in lfw_images:
        faces = detector.detect(image)
        assert len(faces) == 1
        face = faces[0]
        assert_plausible_face(face)
        assert face.box.shape == (4,) and face.landmarks.shape == (5, 2)
        # LFW (deep-funneled) centres the face in the 250x250 frame.
        assert abs((face.box[0] + face.box[2]) / 2 - 125) < 25 and abs((face.box[1] + face.box[3]) / 2 - 125) < 35
        assert 70 < face.width < 160


def test_celeba_and_real_masked_faces(detector, data_dir):
    celeba = cv2.imread(str(data_dir / "celeba299" / "images" / "000093.jpg"))
    masked = cv2.imread(str(data_dir / "rmfd_sample" / "0000" / "0000.jpg"))
    for image in (celeba, masked):
        face = detector.detect_largest(image)
        assert face is not None
        assert_plausible_face(face)


def test_two_faces_side_by_side(detector, lfw_images):
    pair = np.hstack([lfw_images[0], lfw_images[1]])
    faces = detector.detect(pair)
    assert len(faces) == 2
    assert faces[0].score >= faces[1].score
    centres = sorted((face.box[0] + face.box[2]) / 2 for face in faces)
    assert centres[0] < 250 < centres[1]
    for face in faces:
        assert_plausible_face(face)
    assert detector.detect_largest(pair).area == max(face.area for face in faces)


def test_no_face_in_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
    assert detector.detect(np.full((240, 320, 3), 200, np.uint8)) == []
    assert detector.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []
    assert detector.detect_largest(np.zeros((240, 320, 3), np.uint8)) is None
    assert detector.detect(np.zeros((8, 8, 3), np.uint8)) == []  # smaller than P-Net's 12 px cell


def test_grey_images_are_replicated_to_three_channels(detector, lfw_images):
    colour = detector.detect(lfw_images[0])[0]
    grey = cv2.cvtColor(lfw_images[0], cv2.COLOR_BGR2GRAY)
    for image in (grey, grey[:, :, None]):
        faces = detector.detect(image)
        assert len(faces) == 1 and iou(faces[0].box, colour.box) > 0.8


def test_bgra_and_16_bit_give_the_uint8_bgr_result(detector, lfw_images):
    reference = detector.detect(lfw_images[0])[0]
    bgra = cv2.cvtColor(lfw_images[0], cv2.COLOR_BGR2BGRA)
    bgra[:, :, 3] = 0  # alpha is ignored, not composited
    deep = lfw_images[0].astype(np.uint16) * 257  # 16-bit with the same picture content
    for image in (bgra, deep):
        face = detector.detect(image)[0]
        np.testing.assert_allclose(face.box, reference.box)
        np.testing.assert_allclose(face.landmarks, reference.landmarks)


@pytest.mark.parametrize("bad", [
    np.zeros((64, 64, 3), np.float32),
    np.zeros((64, 64, 3), np.int32),
    np.zeros((64, 64, 3), bool),
    np.zeros((64, 64, 2), np.uint8),
    np.zeros((1, 64, 64, 3), np.uint8),
    np.zeros((64,), np.uint8),
    np.zeros((0, 64, 3), np.uint8),
    [[0, 1], [2, 3]],
])
def test_bad_input_raises_input_error(detector, bad):
    with pytest.raises(InputError):
        detector.detect(bad)


def test_huge_image_is_downscaled_and_boxes_map_back(lfw_images):
    face_image = cv2.resize(lfw_images[0], (1000, 1000), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((3000, 4000, 3), 90, np.uint8)
    canvas[1500:2500, 2600:3600] = face_image
    reference = MTCNNDetector(max_side=None).detect(face_image)[0]
    faces = MTCNNDetector(max_side=1280).detect(canvas)
    assert len(faces) == 1
    expected = reference.box + np.array([2600, 1500, 2600, 1500])
    assert iou(faces[0].box, expected) > 0.8
    assert np.max(np.abs(faces[0].landmarks - (reference.landmarks + [2600, 1500]))) < 25


def test_min_face_size_bounds_the_search(lfw_images):
    assert MTCNNDetector(min_face_size=300).detect(lfw_images[0]) == []  # larger than the frame: nothing to scan
    assert len(MTCNNDetector(min_face_size=80).detect(lfw_images[0])) == 1


def test_invalid_settings_raise():
    for settings in ({"min_face_size": 0}, {"min_face_fraction": 1.5}, {"thresholds": (0.6, 0.7)},
                     {"thresholds": (0.6, 0.7, 1.2)}, {"scale_factor": 1.0}, {"max_side": 4}, {"threads": 0}):
        with pytest.raises(InputError):
            MTCNNDetector(**settings)


def test_networks_load_once_per_process():
    first, second = MTCNNDetector(), MTCNNDetector(min_face_size=60)
    assert first._pnet is second._pnet and first._onet is second._onet


def test_detection_to_dict_is_json(detector, lfw_images):
    record = detector.detect(lfw_images[0])[0].to_dict()
    decoded = json.loads(json.dumps(record))
    assert list(decoded["landmarks"]) == ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
    assert len(decoded["box"]) == 4


# --- every registered detector: the interface, the landmark order on real faces, bad input ---------------

from edge_mfr.detect import (DEFAULT_DETECTOR, YuNetDetector, available_detectors,  # noqa: E402
                             describe_detector, get_detector)
from edge_mfr.errors import ModelPackageError  # noqa: E402


@pytest.fixture(scope="module", params=available_detectors())
def any_detector(request):
    return get_detector(request.param)


def test_registry_lists_and_builds_every_detector():
    names = available_detectors()
    assert {"yunet", "mtcnn", "mtcnn-fast"} <= set(names) and DEFAULT_DETECTOR in names
    for name in names:
        detector = get_detector(name, threads=1)
        assert detector.registry_name == name and describe_detector(name)
    assert isinstance(get_detector("yunet", max_side=320), YuNetDetector)
    assert get_detector("mtcnn-fast").scale_factor == 0.6
    assert get_detector("mtcnn-fast", scale_factor=0.5).scale_factor == 0.5  # keywords override the preset


def test_unknown_detector_names_the_available_ones():
    with pytest.raises(InputError) as error:
        get_detector("haar")
    message = str(error.value)
    assert "haar" in message and all(name in message for name in available_detectors())


def test_every_detector_gives_landmarks_in_aligner_order_on_real_faces(any_detector, lfw_images, data_dir):
    masked = cv2.imread(str(data_dir / "rmfd_sample" / "0000" / "0000.jpg"))
    celeba = cv2.imread(str(data_dir / "celeba299" / "images" / "000093.jpg"))
    for image in (*lfw_images, masked, celeba):
        face = any_detector.detect_largest(image)
        assert face is not None
        assert_plausible_face(face)


def test_detectors_agree_on_landmarks_of_real_faces(lfw_images):
    """YuNet's points are the same five points as MTCNN's, within a fraction of the eye distance."""
    reference, yunet = MTCNNDetector(), get_detector("yunet")
    for image in lfw_images:
        expected, found = reference.detect_largest(image), yunet.detect_largest(image)
        eye_distance = np.linalg.norm(expected.landmarks[1] - expected.landmarks[0])
        error = np.linalg.norm(found.landmarks - expected.landmarks, axis=1) / eye_distance
        assert error.max() < 0.3, error
        assert iou(found.box, expected.box) > 0.6


def test_yunet_onet_marks_the_points_mtcnn_marks(lfw_images):
    """yunet-onet: MTCNN's R-Net and O-Net tighten YuNet's box and O-Net marks the points, so they land on
    MTCNN's own points (the teacher template's convention) closer than YuNet's do."""
    reference, yunet, remarked = MTCNNDetector(), get_detector("yunet"), get_detector("yunet-onet")
    for image in lfw_images:
        expected = reference.detect_largest(image)
        eye_distance = np.linalg.norm(expected.landmarks[1] - expected.landmarks[0])
        errors = [np.linalg.norm(d.detect_largest(image).landmarks - expected.landmarks, axis=1).mean() / eye_distance
                  for d in (yunet, remarked)]
        assert errors[1] < 0.06 and errors[1] < errors[0], errors


def test_yunet_finds_a_face_too_large_for_its_training_range(lfw_images):
    """A close-up face of ~700 px is found by the half-scale pass, mapped back to the caller's pixels."""
    big = cv2.resize(lfw_images[0], (1200, 1200), interpolation=cv2.INTER_CUBIC)
    reference = get_detector("yunet").detect(lfw_images[0])[0]
    one_pass = YuNetDetector(max_side=None, large_face_pass=False).detect(big)
    faces = YuNetDetector(max_side=None).detect(big)
    assert len(faces) >= 1
    assert iou(faces[0].box, reference.box * 4.8) > 0.7
    # At full size the face is beyond YuNet's training range: one pass alone boxes it worse.
    assert not one_pass or iou(one_pass[0].box, reference.box * 4.8) < iou(faces[0].box, reference.box * 4.8)
    assert np.max(np.abs(faces[0].landmarks - reference.landmarks * 4.8)) < 40


def test_yunet_min_face_size_downscales_but_still_finds_the_face(lfw_images):
    from edge_mfr.bench import fit_frame

    frame = fit_frame(lfw_images[1], (640, 480))
    full, fast = YuNetDetector().detect_largest(frame), YuNetDetector(min_face_size=48).detect_largest(frame)
    assert full is not None and fast is not None and iou(full.box, fast.box) > 0.8
    eye_distance = np.linalg.norm(full.landmarks[1] - full.landmarks[0])
    assert np.max(np.linalg.norm(fast.landmarks - full.landmarks, axis=1)) < 0.15 * eye_distance


def test_yunet_input_sides_need_not_be_multiples_of_32(lfw_images):
    odd = np.ascontiguousarray(lfw_images[2][:241, :227])
    face = YuNetDetector().detect_largest(odd)
    assert face is not None
    assert_plausible_face(face)


def test_every_detector_finds_nothing_in_blank_or_noise(any_detector):
    rng = np.random.default_rng(0)
    assert any_detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
    assert any_detector.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []
    assert any_detector.detect_largest(np.full((480, 640, 3), 200, np.uint8)) is None
    assert any_detector.detect(np.zeros((8, 8, 3), np.uint8)) == []


@pytest.mark.parametrize("bad", [np.zeros((64, 64, 3), np.float32), np.zeros((64, 64, 2), np.uint8),
                                 np.zeros((0, 64, 3), np.uint8), [[0, 1], [2, 3]]])
def test_every_detector_refuses_bad_input(any_detector, bad):
    with pytest.raises(InputError):
        any_detector.detect(bad)


def test_invalid_yunet_settings_raise():
    for settings in ({"score_threshold": 1.5}, {"nms_threshold": 0}, {"max_side": 16}, {"min_face_size": 0},
                     {"min_face_fraction": 2}, {"top_k": 0}, {"threads": 0}):
        with pytest.raises(InputError):
            YuNetDetector(**settings)


def test_yunet_refuses_a_replaced_model_file(tmp_path, monkeypatch):
    import edge_mfr.detect.yunet as yunet

    tampered = tmp_path / "yunet.onnx"
    tampered.write_bytes(yunet.MODEL_PATH.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(yunet, "MODEL_PATH", tampered)
    yunet._session.cache_clear()
    try:
        with pytest.raises(ModelPackageError, match="sha256"):
            YuNetDetector(threads=3)
    finally:
        yunet._session.cache_clear()


def test_yunet_model_ships_with_licence_and_provenance():
    import edge_mfr.detect.yunet as yunet

    folder = yunet.MODEL_PATH.parent
    assert "MIT License" in (folder / "LICENSE.yunet").read_text()
    assert yunet.MODEL_SHA256 in (folder / "PROVENANCE.md").read_text()


def test_face_unlock_takes_a_detector_by_name_or_uses_the_default(model_package):
    from edge_mfr.unlock import FaceUnlock

    default = FaceUnlock(model=model_package).detector
    assert default.registry_name == DEFAULT_DETECTOR
    # Built to search only for faces the quality gate could accept.
    assert default.min_face_size == min(FaceUnlock(model=model_package).verify_policy.min_face_size,
                                        FaceUnlock(model=model_package).enroll_policy.min_face_size)
    assert FaceUnlock(model=model_package, detector="mtcnn-fast").detector.registry_name == "mtcnn-fast"
    with pytest.raises(InputError, match="available detectors"):
        FaceUnlock(model=model_package, detector="nope")


def test_yunet_unlock_setting_falls_back_to_a_full_pass_only_without_a_usable_face(lfw_images, monkeypatch):
    """Cascade: a 640x480 frame with a usable face costs one shrunk pass; a frame whose only face is smaller
    than min_face_size gets a second pass at the full scale, which finds it (the quality gate then refuses
    it as too small, instead of the unlock seeing no face)."""
    from edge_mfr.bench import fit_frame

    scales = []
    real_pass = YuNetDetector._pass
    monkeypatch.setattr(YuNetDetector, "_pass", lambda self, image, scale: scales.append(scale) or real_pass(
        self, image, scale))
    near = fit_frame(lfw_images[1], (640, 480))
    face = YuNetDetector(min_face_size=48).detect_largest(near)
    assert face is not None and min(face.width, face.height) >= 48 and scales == [0.5]

    far = np.zeros((480, 640, 3), np.uint8)
    far[200:260, 300:360] = cv2.resize(lfw_images[1], (60, 60), interpolation=cv2.INTER_AREA)  # a ~25 px face
    scales.clear()
    shrunk_only = YuNetDetector(min_face_size=48, fallback_pass=False).detect(far)
    assert scales == [0.5]
    assert all(min(f.width, f.height) < 48 for f in shrunk_only)
    scales.clear()
    found = YuNetDetector(min_face_size=48).detect_largest(far)
    assert scales == [0.5, 1.0]
    assert found is not None and 300 <= found.box[0] < found.box[2] <= 360 and 200 <= found.box[1] < found.box[3] <= 262
    assert min(found.width, found.height) < 48
