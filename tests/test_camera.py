"""Tests of data_prep's virtual camera over photographs (`data_prep.py camera`): the
geometry of pans, zooms and parallax, the split by photograph, determinism, and errors."""

import h5py
import numpy as np
import pytest
from PIL import Image

import data_prep
from data_prep import DataError, VideoStore, main, splits_in


def texture(rng, height, width, blur=4):
    """A smooth random RGB texture: noise averaged over blur x blur blocks and upsampled
    bilinearly, so that a shift of it is well defined at sub-pixel offsets."""
    small = rng.integers(0, 256, (height // blur + 2, width // blur + 2, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((width + 2 * blur, height + 2 * blur), Image.BILINEAR)
    return np.asarray(big)[blur:blur + height, blur:blur + width]


def flat_photos(folder, count, size=(160, 140)):
    """`count` photos of one flat colour each, photo i of colour colour(i)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, colour(i)).save(folder / f"photo{i:02d}.png")
    return folder


def colour(i):
    return (10 + 20 * i, 250 - 20 * i, 40 + 7 * i)


def sources(path, split):
    with h5py.File(path) as f:
        return [s.decode() for s in f["sources"][split][()]]


def read_split(path, split):
    with VideoStore(path, split) as store:
        return [store.read(i, 0, n) for i, n in enumerate(store.lengths)]


# ---------------------------------------------------------------------------------------
# Geometry: what a pan, a zoom and a parallax do to the frames
# ---------------------------------------------------------------------------------------

def test_pan_translates_by_the_velocity():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(texture(rng, 400, 500))
    size, view = 64, 192.0  # 3 photo px per frame px
    for velocity, every in (((3, -2), 1), ((1.5, 0.5), 2)):
        boxes = data_prep.pan_boxes((100.0, 150.0), view, velocity, 7, size)
        frames = data_prep.render_boxes(photo, boxes, size).astype(float)
        # the view moves +v frame px a frame, so the picture moves -v: frame t+k at (y, x)
        # shows frame t at (y + k vy, x + k vx); k = 2 makes the half-pixel steps whole
        dx, dy = (round(every * v) for v in velocity)
        for t in range(len(frames) - every):
            later, now = frames[t + every], frames[t]
            shifted = later[max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
            source = now[max(0, dy):size + min(0, dy), max(0, dx):size + min(0, dx)]
            error = np.abs(shifted - source)[4:-4, 4:-4].mean()  # borders: filter support
            assert error < 1.0, (velocity, t, error)
            assert np.abs(later - now).mean() > 8 * error + 2  # the shift is what matched


def test_zoom_scales_about_a_fixed_centre():
    boxes = data_prep.zoom_boxes((200.0, 120.0), 90.0, 0.05, 6)
    side = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_allclose(side, boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(np.diff(np.log(side)), 0.05)  # a constant rate
    np.testing.assert_allclose((boxes[:, :2] + boxes[:, 2:]) / 2, [[200, 120]] * 6)
    np.testing.assert_allclose(side[0], 90)
    # a ramp of one grey level per photo px, rendered in float: as the view grows (zooming
    # out) the ramp gets steeper in frame px, by exp(0.05) a frame
    ramp = Image.fromarray(np.tile(np.arange(400, dtype=np.float32), (240, 1)))
    frames = data_prep.render_boxes(ramp, boxes, 32)
    np.testing.assert_allclose(frames[:, 16, 29] - frames[:, 16, 2], 27 * side / 32, rtol=1e-4)


def test_random_pans_and_zooms_stay_inside_at_constant_motion():
    rng = np.random.default_rng(1)
    for _ in range(200):
        size, frames = int(rng.choice([16, 32, 64])), int(rng.integers(2, 60))
        photo = tuple(rng.integers(4 * size, 20 * size, 2))
        velocity = data_prep._random_velocity(rng, size, sideways=bool(rng.random() < 0.5))
        assert 0.5 * size / 32 - 1e-9 <= np.linalg.norm(velocity) <= 2 * size / 32 + 1e-9
        boxes, used = data_prep._random_pan(rng, photo, size, frames, velocity)
        assert np.all(np.abs(used) <= np.abs(velocity) + 1e-12)  # slowed, never sped up
        # every frame the view moves `used` frame px: (view / size) photo px per frame px
        view = boxes[0, 2] - boxes[0, 0]
        np.testing.assert_allclose(np.diff(boxes, axis=0),
                                   np.tile(used * view / size, (frames - 1, 2)), atol=1e-9)
        zoom = data_prep._random_zoom(rng, photo, size, frames)
        side = zoom[:, 2] - zoom[:, 0]
        assert side.min() >= size - 1e-6  # never enlarged beyond the photo's pixels
        for b in (boxes, zoom):
            assert b[:, :2].min() >= -1e-6 and np.all(b[:, 2:] <= np.array(photo) + 1e-6)
    # a window that reaches the photo's edge may overshoot it by a rounding error
    edge = [[-1e-12, 0, 100 + 1e-12, 80]]
    assert data_prep.render_boxes(Image.new("RGB", (100, 80)), edge, 8).shape == (1, 8, 8, 3)


def test_parallax_layers_move_at_their_own_speeds():
    rng = np.random.default_rng(2)
    back, front = (Image.fromarray(texture(rng, 300, 500)) for _ in range(2))
    size, view = 64, 128.0
    near = data_prep.pan_boxes((50.0, 60.0), view, (4, 0), 6, size)
    far = data_prep.pan_boxes((80.0, 40.0), view, (1, 0), 6, size)
    # the foreground: rows below 60 + 64 photo px, i.e. the lower half of the frame
    mask = Image.fromarray(((np.arange(300)[:, None] >= 124) * np.ones(500)).astype(np.uint8)
                           * 255)
    video = data_prep.parallax_frames(back, front, far, near, mask, size).astype(float)
    only_back = data_prep.render_boxes(back, far, size)
    only_front = data_prep.render_boxes(front, near, size)
    np.testing.assert_allclose(video[:, :24], only_back[:, :24], atol=1)
    np.testing.assert_allclose(video[:, 40:], only_front[:, 40:], atol=1)
    for band, speed in ((slice(4, 24), 1), (slice(40, 60), 4)):
        later, now = video[1:, band, :size - speed], video[:-1, band, speed:]
        assert np.abs(later - now)[..., 4:-4, :].mean() < 1.0


# ---------------------------------------------------------------------------------------
# The data set: split by photograph, deterministic, errors
# ---------------------------------------------------------------------------------------

def test_camera_splits_by_photograph(tmp_path):
    images = flat_photos(tmp_path / "photos", 10)
    out = tmp_path / "cam.h5"
    assert main(["camera", "--images", str(images), "--out", str(out), "--videos", "12,4,4",
                 "--frames", "5", "--val_frac", "0.2", "--test_frac", "0.2"]) == 0
    assert splits_in(out) == ["train", "val", "test"]
    expected = data_prep._split_by_fraction(sorted(images.iterdir()), images, 0.2, 0.2)
    photos_of, kinds = {}, set()
    for split in ("train", "val", "test"):
        videos, lines = read_split(out, split), sources(out, split)
        assert len(videos) == len(lines) == {"train": 12, "val": 4, "test": 4}[split]
        photos_of[split] = {p.name for p in expected[split]}
        for video, line in zip(videos, lines):
            kind, *names = line.replace(" over ", " ").split()
            kinds.add(kind)
            assert set(names) <= photos_of[split], (split, line)
            colours = np.array([colour(int(n[5:7])) for n in names], float)
            pixels = video.reshape(-1, 3).astype(float)
            if kind != "parallax":  # a flat photo gives frames of exactly its colour
                assert np.abs(pixels - colours[0]).max() <= 1
            else:  # each pixel a mix of the two photos' colours
                share = (pixels - colours[1]) @ (colours[0] - colours[1]) / np.sum(
                    (colours[0] - colours[1]) ** 2)
                mixed = colours[1] + share[:, None] * (colours[0] - colours[1])
                assert np.abs(pixels - mixed).max() <= 1.5
    assert kinds == {"pan", "zoom", "parallax"}
    assert len(photos_of["val"]) == len(photos_of["test"]) == 2
    assert not (photos_of["train"] & photos_of["val"] or photos_of["train"] & photos_of["test"]
                or photos_of["val"] & photos_of["test"])
    with h5py.File(out) as f:
        assert f.attrs["kind"] == "camera" and f.attrs["photos_val"] == 2


def test_camera_is_deterministic_per_seed(tmp_path):
    rng = np.random.default_rng(3)
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(6):
        Image.fromarray(texture(rng, 150 + 10 * i, 200)).save(images / f"p{i}.png")

    def make(name, seed, motion="mix"):
        data_prep.write_camera(images, tmp_path / name, 32, "6,2,2", 6, motion, 0.2, 0.2, seed,
                               progress=False)
        return {s: (read_split(tmp_path / name, s), sources(tmp_path / name, s))
                for s in ("train", "val", "test")}

    first, again, other = make("a.h5", 5), make("b.h5", 5), make("c.h5", 6)
    for split in first:
        assert first[split][1] == again[split][1]
        for x, y in zip(first[split][0], again[split][0]):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(first["train"][0], other["train"][0]))
    for motion in ("pan", "zoom", "parallax"):
        made = make(f"{motion}.h5", 0, motion)
        assert all(line.startswith(motion + " ") for s in made for line in made[s][1])
        assert all(v.shape == (6, 32, 32, 3) for s in made for v in made[s][0])


def test_camera_video_counts():
    photos = {"train": list("abcdefgh"), "val": ["i"], "test": ["j"]}
    assert data_prep._camera_counts("600,60,60", photos) == {"train": 600, "val": 60,
                                                             "test": 60}
    assert data_prep._camera_counts(20, photos) == {"train": 16, "val": 2, "test": 2}
    assert data_prep._camera_counts("5,0,1", photos) == {"train": 5, "test": 1}
    for bad in ("0", "6,1", "a", "5,-1,1", "0,1,1"):
        with pytest.raises(DataError, match="must be a total N >= 1 or TRAIN,VAL,TEST"):
            data_prep._camera_counts(bad, photos)
    with pytest.raises(DataError, match="no photograph is in val; pass --val_frac above 0"):
        data_prep._camera_counts("5,1,1", {"train": ["a"], "test": ["b"]})


def test_camera_errors(tmp_path, capsys):
    def camera(images, *more):
        return main(["camera", "--images", str(images), "--out", str(tmp_path / "o.h5"),
                     "--videos", "3,1,1", *map(str, more)])

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no photos")
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    errors = []
    for images, more in ((tmp_path / "empty", ()), (tmp_path / "nowhere", ()),
                         (flat_photos(tmp_path / "few", 2), ("--val_frac", 0.2))):
        assert camera(images, *more) == 2
        errors.append(capsys.readouterr().err)
    assert "no image files (.png" in errors[0] and "pass the folder that holds" in errors[0]
    assert "is not a directory; pass --images" in errors[1]
    assert "2 photographs cannot be split" in errors[2]
    small = flat_photos(tmp_path / "small", 5)
    Image.new("RGB", (300, 100)).save(small / "tiny.png")
    assert camera(small) == 2
    error = capsys.readouterr().err
    assert "tiny.png is 300x100, too small for 32x32 frames (short side under 128)" in error
    assert "remove it or lower --image_size" in error and error.count("\n") == 1
    assert camera(small, "--image_size", 24) == 0  # 100 >= 4 x 24
    (small / "broken.jpg").write_bytes(b"not a jpeg")
    assert camera(small, "--force") == 2
    assert "cannot read image" in capsys.readouterr().err
    with pytest.raises(DataError, match="need --frames >= 2"):
        data_prep.write_camera(small, tmp_path / "f.h5", frames=1)
    with pytest.raises(DataError, match="unknown --motion 'tilt'"):
        data_prep.write_camera(small, tmp_path / "f.h5", motion="tilt")
    assert not (tmp_path / "f.h5").exists()
