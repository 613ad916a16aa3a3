"""Tests of data_prep: round trips through every writer, the plain official layout, video
files and read_clip, the bouncing-balls physics, the occluder's memory property, and one
DataError per kind of bad input."""

import multiprocessing
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import data_prep
from conftest import write_video
from data_prep import DataError, VideoStore, main, splits_in, write_videos

SCRIPT = Path(data_prep.__file__)


def random_videos(rng, count, frames=4, size=8):
    return [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(count)]


def write_plain(path, videos):
    """A file in the plain official layout, written with raw h5py (no data_prep)."""
    with h5py.File(path, "w") as f:
        f.create_group("len")
        for i, video in enumerate(videos):
            f["len"].create_dataset(str(i), data=len(video))
            group = f.create_group(str(i))
            for t, frame in enumerate(video):
                group.create_dataset(str(t), data=frame, compression="lzf")


def read_all(store):
    return [store.read(i, 0, n) for i, n in enumerate(store.lengths)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def small_h5(tmp_path, rng):
    """A data_prep file with train (3 videos) and test (2 videos); returns (path, splits)."""
    splits = {"train": random_videos(rng, 3, frames=5), "test": random_videos(rng, 2)}
    path = tmp_path / "small.h5"
    write_videos(path, splits, progress=False)
    return path, splits


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

def test_write_read_round_trip(small_h5):
    path, splits = small_h5
    assert splits_in(path) == ["train", "test"]
    for name, videos in splits.items():
        with VideoStore(path, name) as store:
            assert len(store) == len(videos)
            assert store.lengths == [len(v) for v in videos]
            assert store.frame_shape == (8, 8, 3)
            assert store.nbytes == sum(v.size for v in videos)
            for got, want in zip(read_all(store), videos):
                np.testing.assert_array_equal(got, want)


def test_read_with_step_and_bounds(small_h5):
    path, splits = small_h5
    store = VideoStore(path, "train")
    np.testing.assert_array_equal(store.read(1, 1, 5, 2), splits["train"][1][1:5:2])
    assert store.read(0, 2, 2).shape == (0, 8, 8, 3)
    with pytest.raises(IndexError):
        store.read(3, 0, 1)
    with pytest.raises(IndexError):
        store.read(0, 0, 6)


def test_frames_cli_round_trip(tmp_path, rng):
    # Names chosen so that plain string order would be wrong: 'f2' < 'f10', 'v9' < 'v10'.
    frame_names = ["f1.png", "f2.png", "f10.png"]
    layout = {"train": ["v9", "v10", "clip_a"], "test": ["only"]}
    want = {}
    for split, names in layout.items():
        for name in names:
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            video = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
            for frame, file in zip(video, frame_names):
                Image.fromarray(frame).save(folder / file)
            want[split, name] = video
    (tmp_path / "data" / "train" / "v9" / "notes.txt").write_text("ignored")
    out = tmp_path / "frames.h5"
    assert main(["frames", "--data_dir", str(tmp_path / "data"), "--out", str(out),
                 "--image_size", "6"]) == 0
    assert splits_in(out) == ["train", "test"]
    train = VideoStore(out, "train")
    for i, name in enumerate(["clip_a", "v9", "v10"]):  # natural order of video folders
        np.testing.assert_array_equal(train.read(i, 0, 3), want["train", name])
    np.testing.assert_array_equal(VideoStore(out, "test").read(0, 0, 3), want["test", "only"])


def test_frames_resize_and_gray_to_rgb(tmp_path):
    folder = tmp_path / "data" / "val" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((20, 12), 200, np.uint8)).save(folder / "0.jpg")
    out = tmp_path / "r.h5"
    assert main(["frames", "--data-dir", str(tmp_path / "data"), "--out_dir", str(out),
                 "--image_size", "8", "--extension", ".jpg"]) == 0
    frames = VideoStore(out, "val").read(0, 0, 1)
    assert frames.shape == (1, 8, 8, 3)
    assert np.abs(frames.astype(int) - 200).max() <= 3


def test_npy_tnhw_gray_is_replicated(tmp_path, rng):
    array = rng.integers(0, 256, (5, 4, 8, 8), dtype=np.uint8)  # (T, N, H, W): Moving MNIST
    np.save(tmp_path / "mm.npy", array)
    out = tmp_path / "mm.h5"
    assert main(["npy", "--input", str(tmp_path / "mm.npy"), "--out", str(out),
                 "--test_frac", "0.25"]) == 0
    train, test = VideoStore(out, "train"), VideoStore(out, "test")
    assert (len(train), len(test)) == (3, 1)
    got = read_all(train) + read_all(test)
    for n in range(4):
        np.testing.assert_array_equal(got[n], np.repeat(array[:, n, :, :, None], 3, axis=-1))


def test_npy_nthwc_float_and_layout(tmp_path, rng):
    array = rng.integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "f.npy", array.astype(np.float32) / 255)
    assert main(["npy", "--input", str(tmp_path / "f.npy"), "--out", str(tmp_path / "f.h5"),
                 "--split", "val"]) == 0
    np.testing.assert_array_equal(np.stack(read_all(VideoStore(tmp_path / "f.h5", "val"))), array)
    # the same videos stored as (T, N, C, H, W) need --layout
    np.save(tmp_path / "c.npy", array.transpose(1, 0, 4, 2, 3))
    assert main(["npy", "--input", str(tmp_path / "c.npy"), "--out", str(tmp_path / "c.h5"),
                 "--layout", "TNCHW"]) == 0
    np.testing.assert_array_equal(np.stack(read_all(VideoStore(tmp_path / "c.h5"))), array)


def test_npy_bad_values(tmp_path):
    np.save(tmp_path / "big.npy", np.full((2, 2, 4, 4), 3.0, np.float32))
    np.save(tmp_path / "int.npy", np.zeros((2, 2, 4, 4), np.int64))
    with pytest.raises(DataError, match=r"float values span \[3, 3\]"):
        data_prep.convert_npy(tmp_path / "big.npy", tmp_path / "o.h5", progress=False)
    with pytest.raises(DataError, match="dtype int64 is not supported"):
        data_prep.convert_npy(tmp_path / "int.npy", tmp_path / "o.h5", progress=False)
    with pytest.raises(DataError, match="layout 'NTHWC' does not fit"):
        data_prep.convert_npy(tmp_path / "big.npy", tmp_path / "o.h5", layout="NTHWC")


def test_plain_official_layout_file_and_shards(tmp_path, rng):
    videos = random_videos(rng, 5, frames=3) + random_videos(rng, 1, frames=7)
    write_plain(tmp_path / "plain.hdf5", videos)
    assert splits_in(tmp_path / "plain.hdf5") == ["plain"]
    for split in ("train", "test", "plain"):  # the plain layout answers every split name
        store = VideoStore(tmp_path / "plain.hdf5", split)
        assert store.lengths == [3] * 5 + [7]
        for got, want in zip(read_all(store), videos):
            np.testing.assert_array_equal(got, want)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_plain(shards / "shard_0001.hdf5", videos[4:])  # each shard numbers videos from 0
    write_plain(shards / "shard_0000.h5", videos[:4])
    store = VideoStore(shards, "val")
    assert len(store) == 6 and splits_in(shards) == ["plain"]
    for got, want in zip(read_all(store), videos):
        np.testing.assert_array_equal(got, want)


def test_store_pickles_and_survives_fork(small_h5):
    path, splits = small_h5
    store = VideoStore(path, "train")
    store.read(0, 0, 1)  # opens a handle, which must not travel
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read(2, 0, 5), splits["train"][2])
    queue = multiprocessing.get_context("fork").SimpleQueue()
    child = multiprocessing.get_context("fork").Process(
        target=lambda: queue.put(store.read(1, 0, 5)))
    child.start()
    got = queue.get()
    child.join()
    np.testing.assert_array_equal(got, splits["train"][1])
    np.testing.assert_array_equal(store.read(1, 0, 5), splits["train"][1])
    store.close()


# ---------------------------------------------------------------------------------------
# Synthetic bouncing balls
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def balls():
    return data_prep.bouncing_balls(200, 40, 32, seed=1)


def test_synthetic_deterministic_per_seed(balls):
    videos, _ = data_prep.bouncing_balls(200, 40, 32, seed=1)
    assert videos.shape == (200, 40, 32, 32, 3) and videos.dtype == np.uint8
    assert videos.tobytes() == balls[0].tobytes()
    other, _ = data_prep.bouncing_balls(200, 40, 32, seed=2)
    assert other.tobytes() != videos.tobytes()


def test_synthetic_balls_inside_and_apart(balls):
    _, state = balls
    pos, radius, active = state["pos"], state["radius"], state["active"]
    r = radius[:, None, :, None]
    inside = (pos >= r - 1e-9) & (pos <= 32 - r + 1e-9)
    assert inside.all(-1)[np.broadcast_to(active[:, None], inside.shape[:-1])].all()
    assert set(active.sum(1)) == {1, 2, 3}
    start = pos[:, 0]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        both = active[:, i] & active[:, j]
        gap = np.linalg.norm(start[:, i] - start[:, j], axis=-1) - radius[:, i] - radius[:, j]
        assert (gap[both] >= 1).all()  # no overlap at the start


def test_synthetic_physics(balls):
    _, state = balls
    pos, vel, radius, active = state["pos"], state["vel"], state["radius"], state["active"]
    speed = np.linalg.norm(vel, axis=-1)  # (N, T, B)
    # Kinetic energy: walls and elastic equal-mass collisions both conserve it.
    energy = (speed ** 2).sum(-1)
    np.testing.assert_allclose(energy, energy[:, :1].repeat(energy.shape[1], 1), rtol=1e-9)
    assert (speed[:, 0][active] >= 1 - 1e-9).all()  # every ball starts moving
    # A ball's speed changes only at a collision with another ball: it must be near one.
    changed = np.abs(np.diff(speed, axis=1)) > 1e-9  # (N, T-1, B)
    step = np.sqrt(energy[:, 0])                    # farthest any ball moves in one frame
    n, t, b = np.nonzero(changed)
    assert len(n) > 0, "some balls should collide"
    others = pos[n, t + 1] - pos[n, t + 1, b][:, None]                   # (K, B, 2)
    reach = radius[n, b][:, None] + radius[n] + 2 * step[n, None]         # (K, B)
    near = np.linalg.norm(others, axis=-1) < reach
    near[np.arange(len(b)), b] = False
    assert (near & active[n]).any(1).all()
    # Single-ball videos: speed is exactly constant, and motion per frame never exceeds it.
    single = active.sum(1) == 1
    one = vel[single, :, 0]  # (n, T, 2): walls flip a component, keep its size
    np.testing.assert_allclose(np.abs(one), np.abs(one[:, :1]).repeat(40, 1))
    moved = np.linalg.norm(np.diff(pos, axis=1), axis=-1)  # (N, T-1, B)
    assert (moved[single] <= speed[single, 1:] + 1e-9).all()
    # No ball can ever hold more than the video's whole kinetic energy.
    assert (moved <= np.sqrt(energy[:, 1:, None]) + 1e-9).all()


def test_synthetic_frames_change(balls):
    videos, _ = balls
    changes = np.abs(np.diff(videos.astype(np.int16), axis=1)).max(axis=(2, 3, 4))  # (N, T-1)
    assert (changes > 0).mean() > 0.99
    assert videos.max() == 255 and (videos[..., 0] == 0).mean() > 0.5  # bright on black


def test_synthetic_cli_and_info(tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["synthetic", "--out", str(out), "--videos", "20", "--frames", "6",
                 "--size", "16", "--max-balls", "2"]) == 0
    assert splits_in(out) == ["train", "val", "test"]
    assert [len(VideoStore(out, s)) for s in ("train", "val", "test")] == [16, 2, 2]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16x16" in text and "6/6/6" in text and "uint8" in text and "on disk" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:4]}
    assert rows["train"][1] == "16" and rows["val"][1] == "2" and rows["test"][1] == "2"


# ---------------------------------------------------------------------------------------
# Bad inputs: one DataError each, naming the problem
# ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        VideoStore(tmp_path / "nope.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.h5 or \*\.hdf5 files"):
        VideoStore(tmp_path / "empty")


def test_not_hdf5_and_truncated(tmp_path, small_h5):
    (tmp_path / "x.h5").write_text("hello, I am text\n")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        VideoStore(tmp_path / "x.h5")
    path, _ = small_h5
    data = path.read_bytes()
    (tmp_path / "half.h5").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match="not a readable HDF5 file.*truncated"):
        VideoStore(tmp_path / "half.h5", "train")


def test_missing_len_video_and_split(tmp_path, rng, small_h5):
    with h5py.File(tmp_path / "nolen.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="no 'len' group"):
        VideoStore(tmp_path / "nolen.h5")
    write_plain(tmp_path / "hole.h5", random_videos(rng, 4))
    with h5py.File(tmp_path / "hole.h5", "a") as f:
        del f["3"]
    with pytest.raises(DataError, match="video group '3' missing"):
        VideoStore(tmp_path / "hole.h5")
    path, _ = small_h5
    with pytest.raises(DataError, match="split 'val' not in file; it has: train, test"):
        VideoStore(path, "val")


def test_mixed_resolutions(tmp_path, rng):
    videos = random_videos(rng, 2, size=8) + random_videos(rng, 1, size=6)
    write_plain(tmp_path / "mixed.h5", videos)
    with pytest.raises(DataError, match=r"mixed resolutions.*video 0 has frames \(8, 8, 3\), "
                                        r"video 2 has \(6, 6, 3\)"):
        VideoStore(tmp_path / "mixed.h5")
    # frame 0 fixes a video's shape; a later frame that differs is caught when read
    videos[2] = random_videos(rng, 1, size=8)[0]
    write_plain(tmp_path / "inner.h5", videos)
    with h5py.File(tmp_path / "inner.h5", "a") as f:
        del f["1/2"]
        f["1"].create_dataset("2", data=np.zeros((9, 8, 3), np.uint8))
    store = VideoStore(tmp_path / "inner.h5")
    with pytest.raises(DataError, match=r"cannot read frame 2 of video 1 .*\(9, 8, 3\)"):
        store.read(1, 0, 4)
    videos[2] = random_videos(rng, 1, size=6)[0]
    with pytest.raises(DataError, match="video 2 has frames"):
        write_videos(tmp_path / "w.h5", {"train": videos}, progress=False)
    assert not (tmp_path / "w.h5").exists()


def test_empty_split_and_no_split_dirs(tmp_path):
    with pytest.raises(DataError, match="split 'train' has no videos"):
        write_videos(tmp_path / "e.h5", {"train": []}, progress=False)
    (tmp_path / "data" / "other").mkdir(parents=True)
    with pytest.raises(DataError, match="no split directories"):
        data_prep.convert_frames(tmp_path / "data", tmp_path / "o.h5", 8)
    (tmp_path / "data" / "train" / "v").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \*\.png frames in .*pass --extension"):
        data_prep.convert_frames(tmp_path / "data", tmp_path / "o.h5", 8, progress=False)


def test_existing_output_needs_force(small_h5, capsys):
    path, _ = small_h5
    before = path.read_bytes()
    assert main(["synthetic", "--out", str(path), "--videos", "3", "--frames", "2"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert main(["synthetic", "--out", str(path), "--videos", "3", "--frames", "2",
                 "--force"]) == 0
    assert len(VideoStore(path, "test")) == 1


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "info", str(tmp_path / "no.h5")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_crash_mid_write_leaves_nothing(tmp_path, rng):
    def crashing():
        yield from random_videos(rng, 2)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_videos(tmp_path / "out.h5", {"train": random_videos(rng, 1), "test": crashing()},
                     progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Video files (PyAV, the optional `video` extra) and read_clip
# ---------------------------------------------------------------------------------------

def write_gif(path, frames):
    """A GIF through Pillow: exact when the frames use few colours."""
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0,
                   optimize=False, disposal=1)


def smooth_video(rng, frames, height, width):
    """Gradients and a moving block: content a lossy codec keeps within a few levels."""
    y, x = np.mgrid[:height, :width]
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t, ..., 0] = 40 + 150 * x // width
        video[t, ..., 1] = 60 + 120 * y // height
        video[t, ..., 2] = 100
        video[t, 4:12, 2 * t:2 * t + 8] = (230, 230, 40)
    return video


def flat_video(value, frames=2, size=8):
    """A video whose every pixel is `value`: its content names it after a split."""
    return np.full((frames, size, size, 3), value, np.uint8)


def videos_cli(*args):
    return main(["videos", *map(str, args)])


def read_split(path, split):
    store = VideoStore(path, split)
    return read_all(store)


def test_videos_lossless_split_folders_and_natural_order(tmp_path, rng, av):
    data = tmp_path / "data"
    (data / "train" / "sub").mkdir(parents=True)
    (data / "test").mkdir()
    want = [rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    write_video(data / "train" / "v10.mkv", want[1])               # ffv1: lossless
    write_video(data / "train" / "v2.mp4", want[0], "libx264rgb", "rgb24", {"qp": "0"})
    write_video(data / "train" / "sub" / "v1.avi", want[2])        # ffv1 in .avi
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)        # 4 colours: GIF is exact
    gif = palette[rng.integers(0, 4, (3, 16, 16))]
    write_gif(data / "test" / "clip.gif", gif)
    (data / "train" / "notes.txt").write_text("ignored")
    (data / "train" / "._v3.mp4").write_bytes(b"macOS resource fork, not a video")
    out = tmp_path / "v.h5"
    assert videos_cli("--data_dir", data, "--out", out, "--image_size", 16) == 0
    assert splits_in(out) == ["train", "test"]
    got = read_split(out, "train")  # natural path order: sub/v1, v2, v10
    for g, w in zip(got, [want[2], want[0], want[1]]):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(read_split(out, "test")[0], gif)


def test_videos_resize_every_max_frames_match_frames_rule(tmp_path, rng, av):
    video = rng.integers(0, 256, (9, 24, 40, 3), dtype=np.uint8)  # not square
    (tmp_path / "flat").mkdir()
    write_video(tmp_path / "flat" / "a.mkv", video)
    out = tmp_path / "v.h5"
    assert videos_cli("--data_dir", tmp_path / "flat", "--out", out, "--image-size", 8,
                      "--every", 2, "--max_frames", 3) == 0
    got = read_split(out, "train")[0]
    # the frames subcommand on the same frames (0, 2, 4) as PNG gives the same pixels
    folder = tmp_path / "frames" / "train" / "a"
    folder.mkdir(parents=True)
    for t in (0, 2, 4):
        Image.fromarray(video[t]).save(folder / f"{t}.png")
    assert main(["frames", "--data_dir", str(tmp_path / "frames"), "--out",
                 str(tmp_path / "f.h5"), "--image_size", "8"]) == 0
    np.testing.assert_array_equal(got, read_split(tmp_path / "f.h5", "train")[0])
    assert got.shape == (3, 8, 8, 3)


def test_videos_lossy_codec_within_tolerance(tmp_path, rng, av):
    video = smooth_video(rng, 8, 32, 32)
    (tmp_path / "d").mkdir()
    write_video(tmp_path / "d" / "kth_like.avi", video, "mpeg4", "yuv420p", {"qscale": "2"})
    write_video(tmp_path / "d" / "clevrer_like.mp4", video, "libx264", "yuv420p", {"crf": "18"})
    out = tmp_path / "v.h5"
    assert videos_cli("--data_dir", tmp_path / "d", "--out", out, "--image_size", 32) == 0
    for got in read_split(out, "train"):
        assert got.shape == video.shape
        # error[t, s]: mean distance of decoded frame t to true frame s
        error = np.abs(got[:, None].astype(int) - video[None]).mean(axis=(2, 3, 4))
        assert error.diagonal().max() < 8  # a lossy codec: a few levels off
        assert (error.argmin(1) == np.arange(len(video))).all()  # each frame in its place


def kth_names():
    """KTH-like file names in one folder per action, persons 1..5."""
    return [f"{action}/person{p:02d}_{action}_d{d}_uncomp.avi" for action in ("walking", "boxing")
            for p in range(1, 6) for d in (1, 2)]


def write_named(root, names, av):
    """One flat 2-frame video per name; video k is filled with the value 10 * k."""
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / name, flat_video(10 * k))


def values(videos):
    return sorted(int(v[0, 0, 0, 0]) for v in videos)


def test_videos_split_by_regex(tmp_path, av):
    names = kth_names()
    write_named(tmp_path / "kth", names, av)
    out = tmp_path / "kth.h5"
    assert videos_cli("--data_dir", tmp_path / "kth", "--out", out, "--image_size", 8,
                      "--split_by", r"person(\d+)_", "--test_groups", "4-5",
                      "--val_groups", "3") == 0
    assert splits_in(out) == ["train", "val", "test"]
    person = [int(n.split("person")[1][:2]) for n in names]
    for split, wanted in (("train", {1, 2}), ("val", {3}), ("test", {4, 5})):
        assert values(read_split(out, split)) == sorted(
            10 * k for k, p in enumerate(person) if p in wanted)
    # lists and single ids, compared as integers ('02' is 2)
    data_prep.convert_videos(tmp_path / "kth", tmp_path / "b.h5", 8, split_by=r"person(\d+)",
                             test_groups="1,05", progress=False)
    assert len(VideoStore(tmp_path / "b.h5", "test")) == 8


def test_videos_split_by_regex_errors(tmp_path, av):
    write_named(tmp_path / "kth", kth_names()[:4] + ["walking/odd_name.avi"], av)

    def convert(**kwargs):
        data_prep.convert_videos(tmp_path / "kth", tmp_path / "o.h5", 8, progress=False,
                                 **kwargs)

    with pytest.raises(DataError, match="odd_name.avi does not match --split_by"):
        convert(split_by=r"person(\d+)", test_groups="2")
    (tmp_path / "kth" / "walking" / "odd_name.avi").unlink()
    with pytest.raises(DataError, match="has no capturing group"):
        convert(split_by=r"person\d+", test_groups="2")
    with pytest.raises(DataError, match="not a valid regular expression"):
        convert(split_by=r"person(\d+", test_groups="2")
    with pytest.raises(DataError, match=r"no file falls in test \(groups found: 01, 02\)"):
        convert(split_by=r"person(\d+)", test_groups="17-25")
    with pytest.raises(DataError, match="needs --test_groups and/or --val_groups"):
        convert(split_by=r"person(\d+)")
    with pytest.raises(DataError, match="range 5-3 is empty"):
        convert(split_by=r"person(\d+)", test_groups="5-3")
    with pytest.raises(DataError, match="need --split_by"):
        convert(test_groups="2")
    with pytest.raises(DataError, match="pass one of them"):
        convert(split_by=r"person(\d+)", test_groups="2", test_frac=0.5)
    assert not (tmp_path / "o.h5").exists()


def test_videos_fraction_split_is_deterministic(tmp_path, av):
    write_named(tmp_path / "kth", kth_names(), av)
    for out in ("a.h5", "b.h5"):
        counts, skipped = data_prep.convert_videos(tmp_path / "kth", tmp_path / out, 8,
                                                   val_frac=0.1, test_frac=0.2, progress=False)
        assert counts == {"train": 14, "val": 2, "test": 4} and skipped == []
    for split in ("train", "val", "test"):
        assert values(read_split(tmp_path / "a.h5", split)) == values(
            read_split(tmp_path / "b.h5", split))
    # the held-out files come from both action folders, not from the last one by name
    held = values(read_split(tmp_path / "a.h5", "val") + read_split(tmp_path / "a.h5", "test"))
    assert min(held) < 100 <= max(held)
    with pytest.raises(DataError, match="cannot be split"):
        data_prep.convert_videos(tmp_path / "kth", tmp_path / "c.h5", 8, test_frac=0.01)


def test_crop_windows():
    windows = data_prep._windows
    assert windows(768, 576, "squeeze") == [(0, 0, 768, 576)]
    assert windows(768, 576, "center") == [(96, 0, 672, 576)]
    assert windows(768, 576, "tiles") == [(0, 0, 576, 576), (192, 0, 768, 576)]
    assert windows(250, 100, "tiles") == [(0, 0, 100, 100), (75, 0, 175, 100),
                                          (150, 0, 250, 100)]
    assert windows(200, 100, "tiles") == [(0, 0, 100, 100), (100, 0, 200, 100)]  # no overlap
    assert windows(100, 250, "center") == [(0, 75, 100, 175)]                     # portrait
    assert windows(100, 250, "tiles")[-1] == (0, 150, 100, 250)
    assert windows(64, 64, "tiles") == windows(64, 64, "center") == [(0, 0, 64, 64)]


def test_videos_crop_center_and_tiles_cut_the_right_windows(tmp_path, rng, av):
    wide = rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)   # (T, H, W, C), 40x24
    tall = rng.integers(0, 256, (3, 40, 24, 3), dtype=np.uint8)   # 24x40
    (tmp_path / "d").mkdir()
    write_video(tmp_path / "d" / "a_wide.mkv", wide)
    write_video(tmp_path / "d" / "b_tall.mkv", tall)

    def convert(crop, size):
        out = tmp_path / f"{crop}{size}.h5"
        assert videos_cli("--data_dir", tmp_path / "d", "--out", out, "--image_size", size,
                          "--crop", crop) == 0
        return read_split(out, "train")

    # at the short side, the windows' pixels as they are
    center = convert("center", 24)
    np.testing.assert_array_equal(center[0], wide[:, :, 8:32])
    np.testing.assert_array_equal(center[1], tall[:, 8:32])
    tiles = convert("tiles", 24)  # ceil(40 / 24) = 2 tiles per file, each its own video
    assert len(tiles) == 4
    for got, want in zip(tiles, [wide[:, :, :24], wide[:, :, 16:], tall[:, :24], tall[:, 16:]]):
        np.testing.assert_array_equal(got, want)
    # smaller: the window, then the one resize rule (LANCZOS)
    def fitted(video, box):
        return np.stack([np.asarray(Image.fromarray(f).crop(box).resize((12, 12), Image.LANCZOS))
                         for f in video])
    small = convert("tiles", 12)
    np.testing.assert_array_equal(small[1], fitted(wide, (16, 0, 40, 24)))
    np.testing.assert_array_equal(small[2], fitted(tall, (0, 0, 24, 24)))
    with h5py.File(tmp_path / "tiles12.h5") as f:
        assert f.attrs["crop"] == "tiles"


def numbered_video(k, frames=20):
    """Flat 8x16 frames that name their file k, frame t and half (tile): 10 + 100k + 4t
    on the left half, one more on the right."""
    video = np.empty((frames, 8, 16, 3), np.uint8)
    for t in range(frames):
        video[t, :, :8], video[t, :, 8:] = 10 + 100 * k + 4 * t, 11 + 100 * k + 4 * t
    return video


def frame_ids(videos):
    """(file, tile, frame) of every frame of flat numbered videos."""
    ids = []
    for video in videos:
        for frame in video:
            assert (frame == frame[0, 0, 0]).all()
            v = int(frame[0, 0, 0]) - 10
            ids.append((v // 100, v % 4, v % 100 // 4))
    return ids


def ids_of(frames, files=(0, 1), tiles=(0, 1)):
    """frame_ids of the given frame numbers, file by file and tile by tile."""
    return [(k, h, t) for k in files for h in tiles for t in frames]


def test_videos_time_split_train_val_test_with_gaps(tmp_path, av, capsys):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_video(tmp_path / "d" / "a.mkv", numbered_video(0))
    write_video(tmp_path / "d" / "sub" / "b.mkv", numbered_video(1))
    out = tmp_path / "t.h5"
    assert videos_cli("--data_dir", tmp_path / "d", "--out", out, "--image_size", 8,
                      "--crop", "tiles", "--time_split", "0.5,0.25", "--gap", 1,
                      "--test_length", 2) == 0
    assert capsys.readouterr().out.endswith(": 4 train, 8 val, 8 test videos\n")
    assert splits_in(out) == ["train", "val", "test"]
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    # 20 frames: cuts at 10 and 15; frames 10 and 15 are the gaps
    assert [len(v) for v in train] == [10] * 4 and frame_ids(train) == ids_of(range(10))
    assert [len(v) for v in val] == [2] * 8 and frame_ids(val) == ids_of(range(11, 15))
    assert [len(v) for v in test] == [2] * 8 and frame_ids(test) == ids_of(range(16, 20))
    seen = [set(frame_ids(split)) for split in (train, val, test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert {t for s in seen for _, _, t in s} == set(range(20)) - {10, 15}
    with h5py.File(out) as f:
        assert (f.attrs["time_split"], f.attrs["gap"], f.attrs["test_length"]) == ("0.5,0.25",
                                                                                  1, 2)
    # a wider gap: the val part (frames 13, 14) holds no 2-frame clip beyond one
    counts, _ = data_prep.convert_videos(tmp_path / "d", tmp_path / "g.h5", 8, crop="tiles",
                                         time_split=(0.5, 0.25), gap=3, test_length=2,
                                         progress=False)
    assert counts == {"train": 4, "val": 4, "test": 4}
    assert frame_ids(read_split(tmp_path / "g.h5", "val")) == ids_of((13, 14))
    assert frame_ids(read_split(tmp_path / "g.h5", "test")) == ids_of((18, 19))


def test_videos_time_split_one_fraction_and_default_gap(tmp_path, av):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_video(tmp_path / "d" / "a.mkv", numbered_video(0))
    write_video(tmp_path / "d" / "sub" / "b.mkv", numbered_video(1))
    out = tmp_path / "t.h5"
    assert videos_cli("--data_dir", tmp_path / "d", "--out", out, "--image_size", 8,
                      "--crop", "tiles", "--time_split", 0.75, "--gap", 0,
                      "--test_length", 2) == 0
    assert splits_in(out) == ["train", "test"]
    train, test = read_split(out, "train"), read_split(out, "test")
    # per file and tile: frames 0-14 in train; 15-16 and 17-18 in test, 19 left out
    assert [len(v) for v in train] == [15] * 4 and [len(v) for v in test] == [2] * 8
    assert frame_ids(train) == ids_of(range(15)) and frame_ids(test) == ids_of(range(15, 19))
    # the default gap; without --test_length the rest of each video is one test video
    counts, _ = data_prep.convert_videos(tmp_path / "d", tmp_path / "u.h5", 8, time_split=0.5,
                                         crop="tiles", progress=False)
    assert counts == {"train": 4, "test": 4}
    test = read_split(tmp_path / "u.h5", "test")
    assert frame_ids(test) == ids_of(range(10 + data_prep.DEFAULT_GAP, 20))
    with h5py.File(tmp_path / "u.h5") as f:
        assert f.attrs["time_split"] == "0.5" and f.attrs["gap"] == data_prep.DEFAULT_GAP
        assert "test_length" not in f.attrs
    # --every first: 10 kept frames (0, 2, ..., 18), 7 to train, 3 to test
    counts, _ = data_prep.convert_videos(tmp_path / "d", tmp_path / "e.h5", 8, every=2,
                                         time_split="0.7", gap=0, crop="tiles", progress=False)
    assert frame_ids(read_split(tmp_path / "e.h5", "train")) == ids_of(range(0, 14, 2))
    assert frame_ids(read_split(tmp_path / "e.h5", "test")) == ids_of((14, 16, 18))


def test_videos_test_length_cuts_val_and_test_of_any_split(tmp_path, av):
    for split, k in (("train", 0), ("test", 1)):
        (tmp_path / "d" / split).mkdir(parents=True)
        write_video(tmp_path / "d" / split / f"{split}.mkv", numbered_video(k))
    out = tmp_path / "f.h5"
    assert videos_cli("--data_dir", tmp_path / "d", "--out", out, "--image_size", 8,
                      "--crop", "tiles", "--test_length", 6) == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    assert frame_ids(train) == ids_of(range(20), files=(0,))  # train stays whole
    assert [len(v) for v in test] == [6] * 6  # 3 clips a tile, frames 18 and 19 left out
    assert frame_ids(test) == ids_of(range(18), files=(1,))
    with pytest.raises(DataError, match="no video has frames enough for a test video with "
                                        "--test_length 30"):
        data_prep.convert_videos(tmp_path / "d", tmp_path / "g.h5", 8, test_length=30,
                                 progress=False)


def test_time_bounds():
    bounds = data_prep._time_bounds
    assert bounds(20, (0.7, 0.15), 2) == {"train": (0, 14), "val": (16, 17), "test": (19, 20)}
    assert bounds(20, (0.7, 0.0), 2) == {"train": (0, 14), "test": (16, 20)}
    assert bounds(7, (0.5, 0.0), 0) == {"train": (0, 4), "test": (4, 7)}  # 3.5 rounds up
    assert bounds(10, (0.5, 0.2), 4)["val"] == (9, 7)  # the gap leaves no val frames


def test_videos_time_split_errors(tmp_path, av):
    write_named(tmp_path / "d", ["a.mkv", "b.mkv", "c.mkv"], av)  # 2 frames each

    def convert(**kwargs):
        data_prep.convert_videos(tmp_path / "d", tmp_path / "o.h5", 8, progress=False,
                                 **kwargs)

    for others in (dict(test_frac=0.3), dict(val_frac=0.3), dict(split_by=r"(\w)\.",
                                                                  test_groups="a")):
        with pytest.raises(DataError, match="--time_split splits every video in time"):
            convert(time_split=0.5, **others)
    for fractions in (0, 1, 1.5, "0.7,0.3", "0.7,0", "0.5,-0.1", "a", "0.1,0.2,0.3", ""):
        with pytest.raises(DataError, match="must be F or F,V with F .train. and V .val."):
            convert(time_split=fractions)
    with pytest.raises(DataError, match="--gap 2 applies to a time split: pass --time_split"):
        convert(gap=2)
    with pytest.raises(DataError, match="--test_length 0 must be at least 1"):
        convert(time_split=0.5, test_length=0)
    with pytest.raises(DataError, match="--gap -1 must be at least 0"):
        convert(time_split=0.5, gap=-1)
    with pytest.raises(DataError, match="frames enough for a test video with --time_split "
                                        "0.5, --gap 0, --test_length 2; use longer videos"):
        convert(time_split=0.5, test_length=2, gap=0)
    with pytest.raises(DataError, match="frames enough for a val video"):
        convert(time_split="0.5,0.25", gap=0, test_length=2)
    with pytest.raises(DataError, match="frames enough for a test video"):
        convert(time_split=0.5)  # the default gap leaves no test frames
    with pytest.raises(DataError, match="unknown --crop 'square'"):
        convert(crop="square")
    (tmp_path / "d" / "test").mkdir()
    write_video(tmp_path / "d" / "test" / "t.mkv", flat_video(1))
    with pytest.raises(DataError, match="drop the split folders"):
        convert(time_split=0.5)
    assert not (tmp_path / "o.h5").exists()


def test_videos_corrupt_file_one_line_error_or_skipped(tmp_path, rng, av):
    data = tmp_path / "d"
    data.mkdir()
    for name in ("a.mkv", "c.mkv"):
        write_video(data / name, rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    (data / "b.mp4").write_bytes(b"this is not a video" * 50)
    out = tmp_path / "v.h5"
    command = [sys.executable, str(SCRIPT), "videos", "--data_dir", str(data), "--out", str(out),
               "--image_size", "8"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert error.startswith("error: cannot decode") and "b.mp4" in error
    assert "--skip-bad" in error and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing written
    result = subprocess.run(command + ["--skip-bad"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "skipped 1 file(s)" in result.stderr and "b.mp4" in result.stderr
    assert "1 train videos" not in result.stdout and "2 train videos" in result.stdout
    assert len(VideoStore(out)) == 2
    # every file of a split bad: nothing to write
    for name in ("a.mkv", "c.mkv"):
        (data / name).write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 3 files of split 'train'"):
        data_prep.convert_videos(data, tmp_path / "w.h5", 8, skip_bad=True, progress=False)
    assert not (tmp_path / "w.h5").exists()


def test_videos_empty_folder_and_missing_pyav(tmp_path, monkeypatch):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no videos here")
    with pytest.raises(DataError, match=r"no video files \(.mp4.*\) in .*empty or its subfolders"):
        data_prep.convert_videos(tmp_path / "empty", tmp_path / "o.h5", 8)
    (tmp_path / "split" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no video files .* in .*train; add videos"):
        data_prep.convert_videos(tmp_path / "split", tmp_path / "o.h5", 8)
    (tmp_path / "empty" / "a.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(DataError, match=r'needs PyAV.*pip install -e "\.\[video\]"'):
        data_prep.convert_videos(tmp_path / "empty", tmp_path / "o.h5", 8)
    with pytest.raises(DataError, match="needs PyAV"):
        data_prep.read_clip(tmp_path / "empty" / "a.mp4", 8)
    assert not (tmp_path / "o.h5").exists()


def test_videos_phone_rotation_is_applied(tmp_path, av):
    """A phone held upright stores landscape frames plus a display matrix (rotation -90):
    the frames come out portrait, as a player shows them."""
    video = np.zeros((3, 16, 32, 3), np.uint8)
    video[:, :4, :4] = 255                       # a marker in the stored top-left corner
    write_video(tmp_path / "phone.mp4", video, "libx264rgb", "rgb24", {"qp": "0"})
    data = bytearray((tmp_path / "phone.mp4").read_bytes())
    identity = struct.pack(">9i", 1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    portrait = struct.pack(">9i", 0, 1 << 16, 0, -1 << 16, 0, 0, 0, 0, 1 << 30)
    at = data.index(identity, data.index(b"tkhd"))  # the track header's display matrix
    data[at:at + 36] = portrait
    (tmp_path / "phone.mp4").write_bytes(data)
    with av.open(str(tmp_path / "phone.mp4")) as container:
        assert next(container.decode(video=0)).rotation == -90
    clip = data_prep.read_clip(tmp_path / "phone.mp4", 32)
    # rotated 90 degrees clockwise: the marker is now top-right (squashed to 32x32)
    upright = np.asarray(Image.fromarray(np.rot90(video[0], -1)).resize((32, 32), Image.LANCZOS))
    np.testing.assert_array_equal(clip[0], upright)
    assert clip[0, :2, -6:].min() > 200 and clip[0, :2, :6].max() < 50


def test_read_clip_folder_npy_and_video(tmp_path, rng, av):
    video = rng.integers(0, 256, (3, 12, 20, 3), dtype=np.uint8)
    folder = tmp_path / "clip"
    folder.mkdir()
    for t, name in enumerate(["2.png", "10.png", "frame_100.png"]):  # text order: 10, 2, f
        Image.fromarray(video[t]).save(folder / name)
    (folder / "notes.txt").write_text("ignored")
    clip = data_prep.read_clip(folder, 8)
    assert clip.shape == (3, 8, 8, 3) and clip.dtype == np.uint8
    # the same resize as the frames subcommand
    split = tmp_path / "frames" / "test"
    split.mkdir(parents=True)
    folder.rename(split / "clip")
    assert main(["frames", "--data_dir", str(tmp_path / "frames"), "--out",
                 str(tmp_path / "f.h5"), "--image_size", "8"]) == 0
    np.testing.assert_array_equal(clip, read_split(tmp_path / "f.h5", "test")[0])
    # the same frames as .npy and as a lossless video file give the same clip
    np.save(tmp_path / "clip.npy", video)
    np.testing.assert_array_equal(data_prep.read_clip(tmp_path / "clip.npy", 8), clip)
    write_video(tmp_path / "clip.mkv", video)
    np.testing.assert_array_equal(data_prep.read_clip(tmp_path / "clip.mkv", 8), clip)
    # grayscale (T, H, W) and float in [0, 1]: replicated to RGB, as the format stores it
    gray = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    np.testing.assert_array_equal(data_prep.read_clip(tmp_path / "gray.npy", 8),
                                  np.repeat(gray[..., None], 3, -1))
    np.save(tmp_path / "float.npy", gray / 255.0)
    np.testing.assert_array_equal(data_prep.read_clip(tmp_path / "float.npy", 8, 3),
                                  np.repeat(gray[..., None], 3, -1))
    # resized gray is the resized RGB copy, and RGBA drops its alpha
    small = data_prep.read_clip(tmp_path / "gray.npy", 5)
    assert small.shape == (4, 5, 5, 3) and (small == small[..., :1]).all()
    np.save(tmp_path / "rgba.npy", np.concatenate([video, video[..., :1]], -1))
    np.testing.assert_array_equal(data_prep.read_clip(tmp_path / "rgba.npy", 8), clip)


def test_read_clip_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no frame images"):
        data_prep.read_clip(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="does not exist"):
        data_prep.read_clip(tmp_path / "nope.mp4", 8)
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown kind of clip"):
        data_prep.read_clip(tmp_path / "clip.txt", 8)
    np.save(tmp_path / "bad.npy", np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(DataError, match=r"shape \(2, 8, 8, 5\)"):
        data_prep.read_clip(tmp_path / "bad.npy", 8)
    with pytest.raises(DataError, match=r"frames are RGB \(C = 3\), got channels=1"):
        data_prep.read_clip(tmp_path / "bad.npy", 8, channels=1)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.png").write_text("not a png")
    with pytest.raises(DataError, match="cannot read image .*0.png"):
        data_prep.read_clip(tmp_path / "frames", 8)


# ---------------------------------------------------------------------------------------
# Synthetic occluder: where one older frame, not the last two, tells what comes next
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def occluder():
    return data_prep.occluded_blocks(300, 32, 32, seed=3)


def test_occluder_deterministic_and_looks(occluder):
    videos, state = occluder
    assert videos.shape == (300, 32, 32, 32, 3) and videos.dtype == np.uint8
    again, _ = data_prep.occluded_blocks(300, 32, 32, seed=3)
    assert again.tobytes() == videos.tobytes()
    other, _ = data_prep.occluded_blocks(300, 32, 32, seed=4)
    assert other.tobytes() != videos.tobytes()
    assert set(state["active"].sum(1)) == {1, 2, 3}
    assert (videos == data_prep.BAR_GREY).all(-1).any(axis=(2, 3)).all()  # the bar: every frame
    memory = state["memory"]
    assert not memory[:, :3].any()        # a memory frame needs three frames before it
    assert 0.1 < memory.mean() < 0.3      # about one frame in six
    assert memory.any(1).mean() > 0.9


def test_occluder_bar_follows_from_the_last_two_frames(occluder):
    videos, state = occluder
    bar, width, cell = state["bar"], state["bar_width"], state["cell"]
    # the next position is a function of the last two: one answer for every pair seen
    following = {}
    for before, now, after in zip(bar[:, :-2].ravel(), bar[:, 1:-1].ravel(), bar[:, 2:].ravel()):
        assert following.setdefault((before, now), after) == after
    assert (np.abs(np.diff(bar, axis=1)) == cell).all()  # one cell a frame, always moving
    # at least one cell of it is always in view, and the grey columns are the bar
    grey = (videos == data_prep.BAR_GREY).all(-1).all(2)                    # (N, T, S)
    columns = np.arange(32)
    assert (grey == ((columns >= bar[..., None]) & (columns < bar[..., None] + width))).all()
    assert grey.sum(-1).min() >= cell


def test_occluder_memory_frames_need_an_older_frame(occluder):
    """At a memory frame t, the video and the same scene without the block that comes out
    have the SAME two frames before t and DIFFERENT frames t; an older frame tells them
    apart, and shows exactly what comes out."""
    videos, state = occluder
    flagged = list(zip(*np.nonzero(state["memory"])))
    assert len(flagged) > 100
    for n, t in flagged[:60]:
        blocks = 0
        for b in np.nonzero(state["active"][n])[0]:
            alt = _without(state, n, b)
            if not np.array_equal(alt[t - 2:t], videos[n, t - 2:t]) or np.array_equal(
                    alt[t], videos[n, t]):
                continue  # block b is in view before t, or stays hidden at t
            blocks += 1
            x0, y0, x1, y1 = state["boxes"][n, b]
            region = videos[n, :t + 1, y0:y1, x0:x1]
            assert (region[t] == state["color"][n, b]).all()  # it comes out whole
            assert not np.array_equal(region[t], region[t - 1])
            assert not np.array_equal(region[t], region[t - 2])
            assert any(np.array_equal(region[s], region[t]) for s in range(t - 2))
        assert blocks, f"video {n} frame {t} is flagged, but no hidden block comes out"


def _without(state, n, b):
    """Video n re-rendered without block b, from the generator's state."""
    active = state["active"][n:n + 1].copy()
    active[0, b] = False
    scene = data_prep._paint_blocks(state["boxes"][n:n + 1], state["color"][n:n + 1], active, 32)
    columns = np.arange(32)
    bar = state["bar"][n, :, None]
    covered = (columns >= bar) & (columns < bar + state["bar_width"])
    return np.where(covered[:, None, :, None], np.uint8(data_prep.BAR_GREY), scene)


def test_occluder_unflagged_reveals_are_not_blocks(occluder):
    """The flags are complete: a block pixel that shows at t after two frames hidden lies
    in a flagged frame (or in a block never seen whole before)."""
    videos, state = occluder
    block = (videos != 0).any(-1) & ~(videos == data_prep.BAR_GREY).all(-1)  # (N, T, H, W)
    hidden = (videos == data_prep.BAR_GREY).all(-1)
    back = block[:, 3:] & hidden[:, 2:-1] & hidden[:, 1:-2]      # came out from the bar
    seen = np.logical_or.accumulate(block, axis=1)[:, :-3]       # seen before t-2
    assert ((back & seen).any(axis=(2, 3)) <= state["memory"][:, 3:]).all()


def test_occluder_file_flags_and_readers(tmp_path, capsys):
    out = tmp_path / "occ.h5"
    assert main(["synthetic", "--kind", "occluder", "--out", str(out), "--videos", "20",
                 "--frames", "12"]) == 0
    _, state = data_prep.occluded_blocks(20, 12, 32, seed=0)
    assert splits_in(out) == ["train", "val", "test"]  # /memory is not a split
    want = {"train": state["memory"][:16], "val": state["memory"][16:18],
            "test": state["memory"][18:]}
    for split, flags in want.items():
        got = data_prep.memory_flags(out, split)
        assert len(got) == len(VideoStore(out, split)) == len(flags)
        for g, w in zip(got, flags):
            assert g.dtype == bool
            np.testing.assert_array_equal(g, w)
    with pytest.raises(DataError, match="split 'memory' not in file"):
        VideoStore(out, "memory")
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kind=occluder" in text
    total = int(state["memory"][:16].sum())
    assert f"memory frames (an older frame needed): train {total} of {16 * 12}" in text


def test_memory_flags_written_checked_and_read(tmp_path, small_h5, rng, capsys):
    path, _ = small_h5
    with pytest.raises(DataError, match="has no memory flags; only .*--kind occluder"):
        data_prep.memory_flags(path, "train")
    videos = random_videos(rng, 2, frames=3)
    out = tmp_path / "m.h5"
    with pytest.raises(DataError, match="memory flags of shape \\(2,\\) for 3 frames"):
        write_videos(out, {"train": videos}, progress=False,
                     memory={"train": [np.zeros(3, bool), np.zeros(2, bool)]})
    with pytest.raises(DataError, match="has 2 videos but 1 memory flag arrays"):
        write_videos(out, {"train": videos}, progress=False,
                     memory={"train": [np.zeros(3, bool)]})
    assert not out.exists()
    flags = [np.array([True, False, True]), np.zeros(3, bool)]
    write_videos(out, {"train": videos}, progress=False, attrs={"kind": "test"},
                 memory={"train": flags})
    for got, want in zip(data_prep.memory_flags(out, "train"), flags):
        assert got.dtype == bool
        np.testing.assert_array_equal(got, want)
    with pytest.raises(DataError, match="no memory flags for split 'test'; it has them for: "
                                        "train"):
        data_prep.memory_flags(out, "test")
    # the readers of frames do not take /memory for a split
    assert splits_in(out) == ["train"]
    with pytest.raises(DataError, match="split 'memory' not in file; it has: train"):
        VideoStore(out, "memory")
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "data: kind=test" in text and "train 2 of 6 (33.3%)" in text


def test_balls_speed_factor(tmp_path, capsys):
    fast, fast_state = data_prep.bouncing_balls(50, 10, 32, seed=5)
    slow, slow_state = data_prep.bouncing_balls(50, 10, 32, seed=5, speed=0.25)
    np.testing.assert_allclose(slow_state["vel"][:, 0], fast_state["vel"][:, 0] * 0.25)
    np.testing.assert_array_equal(slow_state["pos"][:, 0], fast_state["pos"][:, 0])
    step = lambda v: np.abs(np.diff(v.astype(np.int16), axis=1)).mean()  # noqa: E731
    assert step(slow) < 0.5 * step(fast)
    out = tmp_path / "slow.h5"
    assert main(["synthetic", "--out", str(out), "--videos", "5", "--frames", "4",
                 "--speed", "0.25"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "kind=balls" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f.attrs["speed"] == 0.25
    assert main(["synthetic", "--out", str(out), "--speed", "0", "--force"]) == 2
    assert "--speed 0.0 out of range" in capsys.readouterr().err
    assert main(["synthetic", "--kind", "occluder", "--out", str(out), "--speed", "0.5",
                 "--force"]) == 2
    assert "apply to --kind balls only" in capsys.readouterr().err


def test_memory_flags_of_a_shard_directory(tmp_path, rng, capsys):
    """Flags number the videos of every shard in turn, as VideoStore does (issue #25: only
    the first shard was read, so evaluation's flags[i] raised IndexError past it)."""
    shards, want = tmp_path / "shards", []
    shards.mkdir()
    for k, count in enumerate((2, 3)):
        videos = random_videos(rng, count, frames=4)
        flags = [rng.random(4) < 0.5 for _ in videos]
        write_videos(shards / f"part{k}.h5", {"test": videos}, progress=False,
                     memory={"test": flags})
        want += flags
    got = data_prep.memory_flags(shards, "test")
    assert len(got) == len(VideoStore(shards, "test")) == 5
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    capsys.readouterr()
    assert main(["info", str(shards)]) == 0
    total = int(sum(w.sum() for w in want))
    assert f"test {total} of 20" in capsys.readouterr().out


def test_info_help_says_it_takes_an_hdf5_file(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "describe an HDF5 file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "a video file" not in capsys.readouterr().out
