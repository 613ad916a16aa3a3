"""Shared test helpers; makes river.py and data_prep.py importable from a plain checkout."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 10 s on one thread (training runs, "
                            "subprocesses, the claims run); skip them with -m \"not slow\"")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small bouncing-balls file: 24 videos of 20 frames, 32x32 (read-only for the tests)."""
    import data_prep
    path = str(tmp_path_factory.mktemp("data") / "balls.h5")
    data_prep.main(["synthetic", "--out", path, "--videos", "24", "--frames", "20"])
    return path


@pytest.fixture
def av():
    """PyAV, the optional `video` extra (CI installs it)."""
    return pytest.importorskip("av")


def write_video(path, frames, codec="ffv1", pix_fmt="bgr0", options=None):
    """Encode uint8 (T, H, W, 3) frames with PyAV; ffv1 (bgr0) and libx264rgb (qp 0) are
    lossless, so the frames read back exactly."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options or {}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
