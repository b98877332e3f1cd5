"""Tests of the TensorRT backend's own logic, with FAKE tensorrt / pycuda modules.

No GPU, TensorRT or CUDA driver is needed or used here. `FakeTensorRT` and `FakeCuda` below are test
doubles, not TensorRT: they record what edge_mfr.runtime.tensorrt asks for (network flags, profile
shapes, builder flags, workspace limit, calibrator, buffer sizes, tensor addresses, input shapes) and
"execute" an engine by running the package's ONNX graph with ONNX Runtime on fake device memory, so the
backend's batching, copies and normalisation can be compared with the ONNX Runtime backend. They are
injected with monkeypatch in place of `load_libraries()`. Whether the real TensorRT accepts these calls
is only checked on a machine with TensorRT and a GPU.
"""

from __future__ import annotations

import itertools
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from edge_mfr.errors import BackendUnavailableError, InputError, ModelPackageError
from edge_mfr.models.package import ModelPackage, load_package
from edge_mfr.runtime import tensorrt as trt_backend
from edge_mfr.runtime.ort import OrtEmbedder


# --- fakes --------------------------------------------------------------------------------------------

class FakeDeviceAllocation:
    def __init__(self, address: int, nbytes: int):
        self.address, self.nbytes = address, nbytes
        self.memory = bytearray(nbytes)

    def __int__(self) -> int:
        return self.address


class FakeCuda:
    """Fake pycuda.driver: device memory is bytearrays looked up by address; copies are synchronous."""

    def __init__(self, compute_capability=(8, 7)):
        self.allocations: dict[int, FakeDeviceAllocation] = {}
        self._addresses = itertools.count(0x1000, 0x1000)
        self._compute_capability = compute_capability
        self.context_depth = 0
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def name(self):
                return "Fake GPU (not a real device)"

            def compute_capability(self):
                return fake._compute_capability

            def retain_primary_context(self):
                return FakeContext(fake)

        class Stream:
            handle = 0xCAFE

            def synchronize(self):
                pass

        self.Device, self.Stream = Device, Stream

    def init(self):
        pass

    def mem_alloc(self, nbytes):
        allocation = FakeDeviceAllocation(next(self._addresses), int(nbytes))
        self.allocations[allocation.address] = allocation
        return allocation

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def memcpy_htod(self, dest, src):
        data = np.ascontiguousarray(src).tobytes()
        assert len(data) <= dest.nbytes, "host->device copy larger than the device buffer"
        dest.memory[: len(data)] = data

    def memcpy_htod_async(self, dest, src, stream):
        assert self.context_depth > 0, "CUDA call outside a current context"
        self.memcpy_htod(dest, src)

    def memcpy_dtoh_async(self, dest, src, stream):
        assert self.context_depth > 0, "CUDA call outside a current context"
        assert dest.nbytes <= src.nbytes, "device->host copy larger than the device buffer"
        dest[...] = np.frombuffer(bytes(src.memory[: dest.nbytes]), dest.dtype).reshape(dest.shape)

    def read(self, address: int, shape, dtype=np.float32) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.allocations[address].memory[:count]), dtype).reshape(shape)

    def write(self, address: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        assert len(data) <= self.allocations[address].nbytes, "engine output larger than its buffer"
        self.allocations[address].memory[: len(data)] = data


class FakeContext:
    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda

    def push(self):
        self.cuda.context_depth += 1

    def pop(self):
        self.cuda.context_depth -= 1


class FakeCalibratorBase:
    """Stands in for tensorrt.IInt8EntropyCalibrator2 (a pybind11 class our calibrator subclasses)."""

    def __init__(self):
        pass


class FakeTensorRT:
    """Fake `tensorrt` module: records builder requests; its 'engines' are ONNX graphs run by ONNX Runtime."""

    IInt8EntropyCalibrator2 = FakeCalibratorBase

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16 = "FP16"
        INT8 = "INT8"

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class DataType:
        FLOAT = "FLOAT"

    def __init__(self, cuda: FakeCuda, version: str = "10.0.0.fake"):
        self.__version__ = version
        self.cuda = cuda
        self.builds: list[dict] = []  # one record per build_serialized_network call
        self.contexts: list[FakeExecutionContext] = []
        fake = self

        class Builder:
            def __init__(self, logger):
                self.network_flags = None

            def create_network(self, flags):
                self.network_flags = flags
                return FakeNetwork()

            def create_builder_config(self):
                return FakeBuilderConfig()

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                assert fake.cuda.context_depth > 0, "build needs a current CUDA context (the calibrator allocates)"
                calibration = fake._calibrate(config)
                fake.builds.append({"network_flags": self.network_flags, "config": config,
                                    "calibration_batches": calibration})
                profile = config.profiles[0]
                header = {"onnx": network.onnx_path, "input": network.inputs[0].name,
                          "profile": [list(profile.shapes[network.inputs[0].name][i]) for i in range(3)]}
                return (json.dumps(header) + "\n").encode() + b"FAKE-ENGINE"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path):
                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                graph_input = session.get_inputs()[0]
                shape = tuple(d if isinstance(d, int) else -1 for d in graph_input.shape)
                self.network.inputs = [types.SimpleNamespace(name=graph_input.name, shape=shape)]
                self.network.onnx_path = path
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                header, _, body = bytes(blob).partition(b"\n")
                if body != b"FAKE-ENGINE":
                    return None
                return FakeEngine(fake, json.loads(header))

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    def nptype(self, data_type):
        assert data_type == self.DataType.FLOAT
        return np.float32

    def _calibrate(self, config):
        """What the builder does with a calibrator: cache first, else batches until None, then write the cache."""
        calibrator = config.int8_calibrator
        if calibrator is None:
            return None
        if calibrator.read_calibration_cache() is not None:
            return []
        shapes = []
        while (pointers := calibrator.get_batch(["input"])) is not None:
            batch = calibrator.get_batch_size()
            shapes.append(self.cuda.read(pointers[0], (batch, *config.calibration_profile_input_shape[1:])).shape)
        calibrator.write_calibration_cache(b"fake calibration table")
        return shapes


class FakeNetwork:
    def __init__(self):
        self.inputs = []
        self.onnx_path = None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeBuilderConfig:
    def __init__(self):
        self.flags = set()
        self.memory_pool_limits = {}
        self.profiles = []
        self.int8_calibrator = None
        self.calibration_profile = None

    def set_memory_pool_limit(self, pool, size):
        self.memory_pool_limits[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile

    @property
    def calibration_profile_input_shape(self):
        return next(iter(self.calibration_profile.shapes.values()))[1]  # TensorRT calibrates at opt


class FakeEngine:
    def __init__(self, fake: FakeTensorRT, header: dict):
        self.fake = fake
        self.session = ort.InferenceSession(header["onnx"], providers=["CPUExecutionProvider"])
        self.input = header["input"]
        self.output = self.session.get_outputs()[0].name
        self.profile = [tuple(s) for s in header["profile"]]
        self.num_io_tensors = 2

    def get_tensor_name(self, index):
        return (self.input, self.output)[index]

    def get_tensor_mode(self, name):
        return FakeTensorRT.TensorIOMode.INPUT if name == self.input else FakeTensorRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return FakeTensorRT.DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == self.input and profile_index == 0
        return self.profile

    def create_execution_context(self):
        context = FakeExecutionContext(self)
        self.fake.contexts.append(context)
        return context


class FakeExecutionContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.addresses = {}
        self.input_shape = None
        self.executed_shapes = []

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profile
        assert name == self.engine.input
        assert all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)), f"{shape} outside the profile"
        self.input_shape = tuple(shape)
        return True

    def execute_async_v3(self, stream_handle):
        cuda = self.engine.fake.cuda
        assert cuda.context_depth > 0, "execute outside a current CUDA context"
        batch = cuda.read(self.addresses[self.engine.input], self.input_shape)
        (output,) = self.engine.session.run(None, {self.engine.input: batch})
        cuda.write(self.addresses[self.engine.output], output.astype(np.float32))
        self.executed_shapes.append(self.input_shape)
        return True


def fake_libraries(version: str = "10.0.0.fake", compute_capability=(8, 7)):
    cuda = FakeCuda(compute_capability)
    return trt_backend.TensorRTLibraries(trt=FakeTensorRT(cuda, version), cuda=cuda)


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher() -> ModelPackage:
    try:
        return load_package("dlib_resnet_v1")  # the bundled teacher: one network (the default has two)
    except ModelPackageError as exc:
        pytest.skip(f"no bundled model package: {exc}")


@pytest.fixture(scope="module")
def real_faces(teacher, data_dir) -> np.ndarray:
    """70 real calibration-manifest faces aligned for the teacher (more than one 64-face chunk)."""
    from edge_mfr.quant.manifest import calibration_faces, load_manifest

    return calibration_faces(load_manifest(), teacher, data_dir, limit=70)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    libs = fake_libraries()
    monkeypatch.setattr(trt_backend, "load_libraries", lambda: libs)
    monkeypatch.setenv("EDGE_MFR_CACHE", str(tmp_path / "cache"))
    return libs


# --- tests --------------------------------------------------------------------------------------------

def test_missing_libraries_say_what_and_how_to_install(monkeypatch, teacher):
    for name in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(BackendUnavailableError) as error:
        trt_backend.TensorRTEmbedder.from_package(teacher)
    message = str(error.value)
    assert "tensorrt Python package does not import" in message
    assert "pycuda cannot drive a GPU" in message
    assert "pip install edge-mfr[tensorrt]" in message and "NVIDIA" in message and "driver" in message


def test_placeholder_tensorrt_package_is_named_as_such(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # importable, no bindings
    monkeypatch.setitem(sys.modules, "pycuda", None)
    with pytest.raises(BackendUnavailableError, match="placeholder"):
        trt_backend.load_libraries()


def test_other_tensorrt_major_version_is_refused_at_load(monkeypatch):
    fake_trt = types.ModuleType("tensorrt")  # a fake module with TensorRT 11's version number
    fake_trt.Builder, fake_trt.__version__ = object, "11.0.0"
    fake_pycuda = types.ModuleType("pycuda")
    fake_pycuda.driver = types.ModuleType("pycuda.driver")
    fake_pycuda.driver.init = lambda: None
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setitem(sys.modules, "pycuda", fake_pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake_pycuda.driver)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 11\.0\.0 is installed; .* TensorRT 10\.x API"):
        trt_backend.load_libraries()
    fake_trt.__version__ = "10.8.0"
    assert trt_backend.load_libraries().trt is fake_trt


@pytest.mark.parametrize("precision, flags", [("fp32", set()), ("fp16", {"FP16"})])
def test_build_requests_dynamic_batch_profile_flags_and_workspace(fake, teacher, tmp_path, precision, flags):
    engine = trt_backend.build_engine(teacher, tmp_path / "t.engine", precision, workspace_mb=256)
    (build,) = fake.trt.builds
    config = build["config"]
    assert build["network_flags"] == 0  # TensorRT 10: explicit batch is implied by the default flags
    assert config.flags == flags
    assert config.memory_pool_limits == {"WORKSPACE": 256 << 20}
    (profile,) = config.profiles
    assert profile.shapes == {"input": ((1, 3, 150, 150), (8, 3, 150, 150), (64, 3, 150, 150))}
    assert config.int8_calibrator is None

    info = json.loads((tmp_path / "t.engine.json").read_text())
    assert info["package"] == {"name": teacher.name, "fingerprint": teacher.fingerprint}
    assert info["tensorrt_version"] == "10.0.0.fake" and info["precision"] == precision
    assert info["input"]["opt"] == [8, 3, 150, 150] and info["device"]["compute_capability"] == [8, 7]
    assert engine.read_bytes().endswith(b"FAKE-ENGINE")


def test_custom_batch_profile_and_bad_profiles(fake, teacher, tmp_path):
    trt_backend.build_engine(teacher, tmp_path / "t.engine", batch_profile=(1, 32, 64))
    assert fake.trt.builds[0]["config"].profiles[0].shapes["input"][1] == (32, 3, 150, 150)
    for bad in [(0, 8, 64), (1, 65, 64), (8, 4, 64)]:
        with pytest.raises(InputError, match="batch profile"):
            trt_backend.build_engine(teacher, tmp_path / "bad.engine", batch_profile=bad)
    with pytest.raises(InputError, match="precision"):
        trt_backend.build_engine(teacher, tmp_path / "bad.engine", precision="int4")


def test_int8_entropy_calibration_feeds_real_faces_at_opt_batch_then_reuses_cache(fake, teacher, real_faces,
                                                                                  tmp_path):
    cache = tmp_path / "teacher.calibration.cache"
    calibrator = trt_backend.make_entropy_calibrator(real_faces[:20], cache, batch_size=8, libs=fake,
                                                     provenance={"manifest_sha256": "abc"})
    trt_backend.build_engine(teacher, tmp_path / "int8.engine", "int8", calibrator=calibrator)
    build = fake.trt.builds[0]
    assert build["config"].flags == {"FP16", "INT8"}
    assert build["config"].int8_calibrator is calibrator
    assert build["config"].calibration_profile is build["config"].profiles[0]
    assert build["calibration_batches"] == [(8, 3, 150, 150)] * 2  # 20 faces: two full batches of 8
    assert cache.read_bytes() == b"fake calibration table"
    info = json.loads((tmp_path / "int8.engine.json").read_text())
    assert info["int8"] == {"mode": "calibrated (IInt8EntropyCalibrator2)", "manifest_sha256": "abc",
                            "faces": 16, "batch_size": 8}

    again = trt_backend.make_entropy_calibrator(real_faces[:20], cache, batch_size=8, libs=fake)
    trt_backend.build_engine(teacher, tmp_path / "int8b.engine", "int8", calibrator=again)
    assert fake.trt.builds[1]["calibration_batches"] == []  # calibrated from the cache, no batches fed


def test_int8_needs_a_calibrator_at_the_opt_batch_or_a_qdq_package(fake, teacher, real_faces, tmp_path):
    with pytest.raises(InputError, match="needs a calibrator"):
        trt_backend.build_engine(teacher, tmp_path / "e.engine", "int8")
    wrong_batch = trt_backend.make_entropy_calibrator(real_faces[:16], tmp_path / "c", batch_size=4, libs=fake)
    with pytest.raises(InputError, match="opt batch"):
        trt_backend.build_engine(teacher, tmp_path / "e.engine", "int8", calibrator=wrong_batch)
    with pytest.raises(InputError, match="only applies to precision='int8'"):
        trt_backend.build_engine(teacher, tmp_path / "e.engine", "fp16", calibrator=wrong_batch)
    assert fake.trt.builds == []

    # Only the sidecar's recipe is relabelled here: the flag logic reads it, the fake does not care.
    labelled_qdq = ModelPackage(teacher.onnx_path, {**teacher.meta, "recipe": {"quantization": {"format": "QDQ"}}})
    with pytest.raises(InputError, match="QDQ graph"):
        trt_backend.build_engine(labelled_qdq, tmp_path / "e.engine", "fp16")
    trt_backend.build_engine(labelled_qdq, tmp_path / "q.engine", "int8")
    assert fake.trt.builds[0]["config"].flags == {"FP16", "INT8"}
    assert fake.trt.builds[0]["config"].int8_calibrator is None
    assert json.loads((tmp_path / "q.engine.json").read_text())["int8"]["mode"].startswith("explicit")


def test_engine_is_refused_for_another_package_version_gpu_or_changed_file(fake, teacher, tmp_path):
    engine = trt_backend.build_engine(teacher, tmp_path / "t.engine")
    other = ModelPackage(teacher.onnx_path, {**teacher.meta, "name": "other_model", "fingerprint": "f" * 64})
    with pytest.raises(ModelPackageError, match=r"built from model 'dlib_resnet_v1'.*not from 'other_model'"):
        trt_backend.TensorRTEmbedder.from_package(other, engine)

    newer = fake_libraries(version="10.9.0.fake")
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10\.0\.0\.fake, this is TensorRT 10\.9\.0\.fake"):
        trt_backend.TensorRTEmbedder(teacher, engine, libs=newer)

    other_gpu = fake_libraries(compute_capability=(9, 0))
    with pytest.raises(BackendUnavailableError, match="compute capability"):
        trt_backend.TensorRTEmbedder(teacher, engine, libs=other_gpu)

    engine.write_bytes(engine.read_bytes() + b" ")
    with pytest.raises(ModelPackageError, match="does not match the hash"):
        trt_backend.TensorRTEmbedder(teacher, engine, libs=fake)

    (tmp_path / "t.engine.json").unlink()
    with pytest.raises(BackendUnavailableError, match="cannot be matched to a model package"):
        trt_backend.TensorRTEmbedder(teacher, engine, libs=fake)


def test_buffers_batches_and_normalised_output_match_onnxruntime(fake, teacher, real_faces, tmp_path):
    embedder = trt_backend.TensorRTEmbedder.from_package(teacher, trt_backend.build_engine(teacher, tmp_path / "e"))
    sizes = sorted(a.nbytes for a in fake.cuda.allocations.values())
    assert sizes == [64 * 128 * 4, 64 * 3 * 150 * 150 * 4]  # one input and one output buffer, for max batch 64
    (context,) = fake.trt.contexts
    assert set(context.addresses.values()) == set(fake.cuda.allocations)

    embeddings = embedder.embed(real_faces)  # 70 faces: chunks of 64 and 6
    assert context.executed_shapes == [(64, 3, 150, 150), (6, 3, 150, 150)]
    assert embeddings.shape == (70, 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    reference = OrtEmbedder(teacher, threads=2).embed(real_faces)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    assert fake.cuda.context_depth == 0  # every push was popped

    assert embedder.embed(real_faces[:0]).shape == (0, 128)
    with pytest.raises(InputError):
        embedder.embed(real_faces.astype(np.float64))


def test_from_package_builds_the_cached_engine_once(fake, teacher, tmp_path):
    first = trt_backend.TensorRTEmbedder.from_package(teacher)
    second = trt_backend.TensorRTEmbedder.from_package(teacher)
    assert len(fake.trt.builds) == 1
    assert first.engine_path == second.engine_path
    assert first.engine_path.parent == tmp_path / "cache" / "tensorrt"
    assert teacher.fingerprint[:16] in first.engine_path.name and "fp16" in first.engine_path.name
