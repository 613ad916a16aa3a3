"""data_prep: make and read the HDF5 video files that river trains on.

One command line with six subcommands (each has --help):
    frames     folders of image files  data_dir/{train,val,test}/<video>/<frame>.<ext>  -> HDF5
    videos     video files (.mp4 .avi ...; --crop), split by folder/name/fraction, or in
               time (--time_split 0.7,0.15: train, val, test in time order, --gap between) -> HDF5
    npy        one .npy array of videos (e.g. Moving MNIST mnist_test_seq.npy)             -> HDF5
    synthetic  bouncing balls, or (--kind occluder) a bar sweeping over still blocks      -> HDF5
    camera     a virtual camera panning, zooming or moving past two layers over
               photographs, split by photograph                                           -> HDF5
    info       per split: videos, frames per video, resolution, channels, dtype, size

From Python: VideoStore (read one split), splits_in, memory_flags, read_clip (one clip to
predict from: a frame folder, a .npy array or a video file), write_videos, write_camera.

Layout written (the official RIVER layout, one copy per split, all splits in ONE file):
    /train/len/0, /train/len/1, ...    scalar int: number of frames of video 0, 1, ...
    /train/0/0, /train/0/1, ...        uint8 (H, W, C) frames of video 0, lzf-compressed
    /val/...  /test/...                the same layout for the other splits (those that exist)
    /memory/train/0, ...               optional: bool (T,) per video, frames where an older
                                       frame is needed (synthetic --kind occluder)
    /sources/train, ...                optional: one string per video naming its motion and
                                       photographs (camera)
    root attributes                    optional: kind ('balls', 'videos', 'camera', ...),
                                       seed, time_split, gap, ...
Readers find splits as the top-level groups holding `len`, so they skip /memory and /sources.

Layout also read: the plain official layout (`len` and the video groups at the top level,
no split groups), as one file or as a directory of *.h5/*.hdf5 shards, each shard numbering
its videos from 0 and read in sorted file-name order. A plain file has no splits, so it is
returned whatever split is asked for (train and test are then the SAME videos) and
`splits_in` reports it as ['plain'].

Channels: frames are stored as RGB (C = 3); grayscale inputs are replicated to 3 channels.
Resizing: every reader resizes the whole frame to a square with LANCZOS (`_fit`); `videos
--crop` cuts square windows first; `camera` resamples square windows of photographs at
sub-pixel positions, also with LANCZOS (`render_boxes`).
Writing is atomic: a file is written as OUT.tmp-<pid> beside OUT and renamed when complete.
This module owns the format; it never imports river.py (river.py imports it).
"""

import argparse
import bisect
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

SPLITS = ("train", "val", "test")
PLAIN = "plain"  # what splits_in reports for a file in the plain (split-less) layout
MEMORY = "memory"  # top-level group of per-frame flags; it has no `len`, so readers skip it


class DataError(ValueError):
    """A problem with input data or files; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

def write_videos(out, splits, force=False, progress=True, attrs=None, memory=None):
    """Write {split name: iterable of uint8 (T, H, W, C) videos} to the HDF5 file `out`.

    Atomic (see `_new_file`). Videos are consumed lazily, so a generator keeps memory at one
    video. `attrs`: {name: value} stored on the file's root (e.g. kind='occluder'; `info`
    shows them). `memory`: {split: sequence of bool (T,) arrays, one per video}, stored as
    /memory/<split>/<i> (see `memory_flags`); each must match its video's length.
    """
    if not splits:
        raise DataError(f"nothing to write to {out}: no splits given")
    with _new_file(out, force, attrs) as f:
        for name, videos in splits.items():
            split = _SplitWriter(f, name)
            total = len(videos) if hasattr(videos, "__len__") else None
            for video in tqdm(videos, desc=f"writing {name}", total=total, unit="video",
                              disable=not progress):
                split.add(video)
            split.finish()
        for name, flags in (memory or {}).items():
            _write_memory(f, name, flags)


def _check_out(out, force):
    """Fail before any work when `out` cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a directory; pass a file path such as {out / 'data.h5'}")
    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise DataError(f"output directory {out.parent} does not exist; create it first")


@contextmanager
def _new_file(out, force, attrs=None):
    """An HDF5 file open for writing that becomes `out` only when the block completes: it is
    built as `out.tmp-<pid>` in the same directory and renamed onto `out`; on any exception
    the temporary file is removed and `out` is left as it was."""
    _check_out(out, force)
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        # the 1.10 file format stores a small dataset in ~1/5 of the bytes of the 1.8 default
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            f.attrs.update(attrs or {})
            yield f
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _SplitWriter:
    """Appends videos to one split of an open file, in the official layout."""

    def __init__(self, f, name):
        self.name, self.group, self.shape = name, f.create_group(name), None
        self.lengths = self.group.create_group("len")

    def add(self, video):
        video, i = np.asarray(video), len(self.lengths)
        if video.dtype != np.uint8 or video.ndim != 4:
            raise DataError(f"split '{self.name}' video {i}: got {video.dtype} array of shape "
                            f"{video.shape}; videos must be uint8 (T, H, W, C)")
        self.shape = self.shape or video.shape[1:]
        if video.shape[1:] != self.shape:
            raise DataError(f"split '{self.name}': video {i} has frames {video.shape[1:]} but "
                            f"video 0 has {self.shape}; resize all videos to one resolution")
        frames = self.group.create_group(str(i))
        for t, frame in enumerate(video):
            # one chunk per frame: frames are always read whole
            frames.create_dataset(str(t), data=frame, chunks=self.shape, compression="lzf")
        self.lengths.create_dataset(str(i), data=len(video))

    def finish(self):
        if not len(self.lengths):
            raise DataError(f"split '{self.name}' has no videos; add videos or leave the split "
                            f"out")


def _write_memory(f, split, flags):
    """Per-frame flags of one split as /memory/<split>/<i>, checked against the videos."""
    if split not in f:
        raise DataError(f"memory flags given for split '{split}', which has no videos")
    lengths = f[split]["len"]
    if len(flags) != len(lengths):
        raise DataError(f"split '{split}' has {len(lengths)} videos but {len(flags)} memory "
                        f"flag arrays; pass one per video")
    group = f.require_group(MEMORY).create_group(split)
    for i, flag in enumerate(flags):
        flag = np.asarray(flag, bool)
        if flag.shape != (int(lengths[str(i)][()]),):
            raise DataError(f"split '{split}' video {i}: memory flags of shape {flag.shape} "
                            f"for {int(lengths[str(i)][()])} frames; pass one flag per frame")
        group.create_dataset(str(i), data=flag)


class _LazyVideos:
    """A sized iterable that loads each video only when the writer reaches it."""

    def __init__(self, items, load):
        self.items, self.load = items, load

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return map(self.load, self.items)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

def _shard_paths(path):
    """The HDF5 files behind `path`: the file itself, or the sorted shards of a directory."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix in (".h5", ".hdf5"))
        if not shards:
            raise DataError(f"{path} holds no *.h5 or *.hdf5 files; pass an HDF5 file or a "
                            f"directory of shards")
        return shards
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path or create it with "
                        f"`python data_prep.py synthetic --out {path}`")
    return [path]


def _open(path):
    """Open an HDF5 file read-only, turning h5py's OSError into a one-line DataError."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        detail = re.search(r"\((.*)\)", str(e))  # h5py: "Unable to open file (<why>)"
        reason = detail.group(1) if detail else str(e)
        raise DataError(f"{path} is not a readable HDF5 file ({reason}); it may be truncated "
                        f"or not HDF5 at all: re-create or re-download it") from None


def _split_names(f):
    """Top-level groups of `f` that hold a `len` group, official split names first."""
    return _ordered(k for k in f if isinstance(f[k], h5py.Group) and "len" in f[k])


def _ordered(names):
    """Split names in the order train, val, test, then any others by name."""
    return sorted(names, key=lambda k: (SPLITS.index(k) if k in SPLITS else len(SPLITS), k))


def _split_group(f, path, split):
    """The group holding `split` in file `f`; for the plain layout, the file itself."""
    if "len" in f:
        return f
    have = _split_names(f)
    if split in have:
        return f[split]
    if have:
        raise DataError(f"{path}: split '{split}' not in file; it has: {', '.join(have)}; "
                        f"ask for one of those")
    raise _not_river(path, f"no 'len' group and no split groups ({', '.join(SPLITS)})")


def _not_river(where, what):
    return DataError(f"{where}: {what}; not a RIVER video file: convert the data with "
                     f"data_prep.py")


def splits_in(path):
    """Splits stored at `path`, e.g. ['train', 'val', 'test']; ['plain'] for the plain
    official layout (then any split name reads the whole file). Shards share one layout,
    so a directory is judged by its first shard."""
    path0 = _shard_paths(path)[0]
    with _open(path0) as f:
        if "len" in f:
            return [PLAIN]
        names = _split_names(f)
    if not names:
        raise _not_river(path0, f"no 'len' group and no split groups ({', '.join(SPLITS)})")
    return names


def _scan(group, where):
    """Validate one official-layout group; return (lengths, frame shape of each video)."""
    if "len" not in group:
        raise _not_river(where, "no 'len' group")
    lens, keys = group["len"], set(group.keys())
    lengths, shapes = [], []
    for i in range(len(lens)):
        name = str(i)
        if name not in lens:
            raise DataError(f"{where}: 'len' has {len(lens)} entries but no len/{i}; the file "
                            f"is damaged: re-create it")
        if name not in keys:
            raise DataError(f"{where}: video group '{i}' missing (len/{i} exists); the file is "
                            f"incomplete: re-create it")
        length, video = int(lens[name][()]), group[name]
        if len(video) < length:
            raise DataError(f"{where}: video '{i}' has {len(video)} frames but len/{i} says "
                            f"{length}; the file is incomplete: re-create it")
        first = video["0"] if length else None
        if first is not None and (first.dtype != np.uint8 or first.ndim != 3):
            raise DataError(f"{where}: frame {i}/0 is {first.dtype} {first.shape}; frames must "
                            f"be uint8 (H, W, C): re-convert with data_prep.py")
        lengths.append(length)
        shapes.append(first.shape if first is not None else None)
    return lengths, shapes


class VideoStore:
    """Read-only view of ONE split of a RIVER HDF5 file, or of a shard directory.

    Attributes: `lengths` (frames per video), `frame_shape` (H, W, C), `nbytes`
    (uncompressed bytes of all frames). HDF5 handles are opened lazily and reopened in a
    new process (DataLoader workers fork), and never pickled.
    """

    def __init__(self, path, split="train"):
        self.path, self.split = Path(path), split
        self._files = _shard_paths(path)
        self.lengths, shapes, self._starts, self._groups = [], [], [], []
        for file in self._files:
            with _open(file) as f:
                group = _split_group(f, file, split)
                self._groups.append(group.name)
                lengths, file_shapes = _scan(group, f"{file}:{group.name}")
            self._starts.append(len(self.lengths))
            self.lengths += lengths
            shapes += file_shapes
        if not self.lengths:
            raise DataError(f"{self.path}: split '{split}' holds no videos; write some videos "
                            f"to it or pick another split")
        self.frame_shape = _common_shape(shapes, self.path, split)
        self.nbytes = sum(self.lengths) * int(np.prod(self.frame_shape))
        self._handles, self._pid = None, None

    def __len__(self):
        return len(self.lengths)

    def _group(self, k):
        """Group of shard k, (re)opening the files if this process has not opened them."""
        if self._pid != os.getpid():  # fresh store, or a forked worker: never share handles
            self._handles, self._pid = [None] * len(self._files), os.getpid()
        if self._handles[k] is None:
            self._handles[k] = _open(self._files[k])
        return self._handles[k][self._groups[k]]

    def read(self, video, start, stop, step=1):
        """Frames start, start+step, ... < stop of `video` as uint8 (T, H, W, C)."""
        if not 0 <= video < len(self):
            raise IndexError(f"video {video} out of range: {self.path} split '{self.split}' "
                             f"has {len(self)} videos")
        if not 0 <= start <= stop <= self.lengths[video] or step < 1:
            raise IndexError(f"frames {start}:{stop}:{step} out of range for video {video} "
                             f"with {self.lengths[video]} frames")
        k = bisect.bisect_right(self._starts, video) - 1
        frames = self._group(k)[str(video - self._starts[k])]
        indices = range(start, stop, step)
        out = np.empty((len(indices), *self.frame_shape), np.uint8)
        try:
            for j, t in enumerate(indices):
                # the raw HDF5 call: h5py's frames[name][()] costs 3x more per small frame,
                # but it copies without checking sizes, so check the shape first
                frame = h5py.h5d.open(frames.id, str(t).encode())
                if frame.shape != self.frame_shape:
                    raise ValueError(f"frame shape {frame.shape}, expected {self.frame_shape}")
                frame.read(h5py.h5s.ALL, h5py.h5s.ALL, out[j])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{self._files[k]}: cannot read frame {t} of video {video} "
                            f"({e}); the file is damaged: re-create it") from None
        return out

    def close(self):
        """Close the open files (they reopen on the next read)."""
        for handle in self._handles or []:
            if handle is not None:
                handle.close()
        self._handles, self._pid = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = None, None  # h5py handles cannot cross processes
        return state


def _common_shape(shapes, path, split):
    """The one frame shape of a split; name two videos that disagree if there is none."""
    known = [(i, s) for i, s in enumerate(shapes) if s is not None]
    if not known:
        raise DataError(f"{path}: every video of split '{split}' has 0 frames; re-create it")
    first_video, first = known[0]
    for i, shape in known:
        if shape != first:
            raise DataError(f"{path}: mixed resolutions in split '{split}': video {first_video} "
                            f"has frames {first}, video {i} has {shape}; re-convert with one "
                            f"--image_size")
    return first


def memory_flags(path, split="train"):
    """Per-frame memory flags of one split: a list with one bool (T,) array per video, in
    video order, the videos of every shard in turn (as `VideoStore` numbers them). True marks
    a frame whose content the last two frames do not determine and one older frame does
    (written by `synthetic --kind occluder`; see `occluded_blocks`)."""
    flags = []
    for shard in _shard_paths(path):
        with _open(shard) as f:
            group = f.get(MEMORY)
            if not isinstance(group, h5py.Group):
                raise DataError(f"{shard} has no memory flags; only `data_prep.py synthetic "
                                f"--kind occluder` writes them")
            if split not in group:
                raise DataError(f"{shard}: no memory flags for split '{split}'; it has them for: "
                                f"{', '.join(group)}")
            flags += [group[split][str(i)][()].astype(bool) for i in range(len(group[split]))]
    return flags


# ---------------------------------------------------------------------------------------
# frames: folders of images -> HDF5
# ---------------------------------------------------------------------------------------

def _natural_key(path):
    """Sort key that orders 'frame_2' before 'frame_10' (and zero-padded names as usual)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _fit(image, size):
    """The one resize rule of every reader (frames, npy, videos, read_clip): a PIL image
    -> uint8 (size, size, 3) RGB array. The WHOLE image is resized to a square, as the
    official converter does, so the aspect ratio is not kept (`videos --crop` cuts a square
    window first)."""
    from PIL import Image

    image = image.convert("RGB")  # first: palette and 16-bit images must not be resampled raw
    if image.size != (size, size):
        # LANCZOS low-passes before subsampling, so downsizing does not alias
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _load_image(path, size, crop="squeeze"):
    """One image file as uint8 (size, size, 3) RGB, its window of `crop` (`_windows`: squeeze
    or center) fitted by `_fit`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _fit(image.crop(_windows(*image.size, crop)[0]), size)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace or remove the file") from None


def _load_video(folder, extension, size):
    frames = sorted(folder.glob(f"*.{extension}"), key=_natural_key)
    if not frames:
        raise DataError(f"no *.{extension} frames in {folder}; pass --extension matching "
                        f"your image files")
    return np.stack([_load_image(p, size) for p in frames])


def convert_frames(data_dir, out, image_size, extension="png", force=False, progress=True):
    """data_dir/{train,val,test}/<video>/<frame>.<ext> -> one HDF5 file with those splits."""
    data_dir, extension = Path(data_dir), extension.lstrip(".")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a directory; pass --data_dir holding train/, "
                        f"val/ and/or test/")
    splits = {}
    for split in SPLITS:
        if (data_dir / split).is_dir():
            videos = sorted((d for d in (data_dir / split).iterdir() if d.is_dir()),
                            key=_natural_key)
            if not videos:
                raise DataError(f"no video folders in {data_dir / split}; expected "
                                f"{split}/<video>/<frame>.{extension}")
            splits[split] = _LazyVideos(videos, lambda d: _load_video(d, extension, image_size))
    if not splits:
        raise DataError(f"no split directories in {data_dir}; expected "
                        f"{data_dir}/train/<video>/<frame>.{extension} (and/or val/, test/)")
    write_videos(out, splits, force, progress)


# ---------------------------------------------------------------------------------------
# npy: one array of videos -> HDF5
# ---------------------------------------------------------------------------------------

DEFAULT_LAYOUT = {4: "TNHW", 5: "NTHWC"}  # 4-D as Moving MNIST's (T, N, H, W)


def _to_nthwc(array, layout):
    """View `array` with axes named by `layout` as (N, T, H, W, C); C = 1 when absent."""
    layout = layout.upper()
    if sorted(layout) not in (sorted("NTHW"), sorted("NTHWC")) or len(layout) != array.ndim:
        raise DataError(f"layout '{layout}' does not fit an array of shape {array.shape}; pass "
                        f"--layout with one letter per axis from N, T, H, W and optional C")
    if "C" not in layout:
        array, layout = array[..., None], layout + "C"
    return array.transpose([layout.index(axis) for axis in "NTHWC"])


def _uint8_converter(array):
    """A function mapping one video of `array` to uint8; float must lie in [0, 1]."""
    if array.dtype == np.uint8:
        return np.asarray
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if low >= 0 and high <= 1:
            return lambda v: np.round(np.asarray(v, np.float32) * 255).astype(np.uint8)
        raise DataError(f"float values span [{low:g}, {high:g}]; scale them to [0, 1] or "
                        f"convert the array to uint8")
    raise DataError(f"array dtype {array.dtype} is not supported; convert it to uint8 "
                    f"(0..255) or float in [0, 1]")


def _rgb(video):
    """uint8 (..., C) with C = 1 (gray, replicated), 3, or 4 (RGBA, alpha dropped) -> RGB."""
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video[..., :3]


def _resize_video(video, size):
    """uint8 RGB (T, H, W, 3) -> (T, size, size, 3) by the rule of `_fit`."""
    from PIL import Image

    if video.shape[1:3] == (size, size):
        return video
    return np.stack([_fit(Image.fromarray(frame), size) for frame in video])


def _load_npy(path, mmap_mode=None):
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load {path} as .npy ({e}); pass a file saved by numpy.save")


def convert_npy(input, out, layout=None, split="train", val_frac=0.0, test_frac=0.0,
                image_size=None, force=False, progress=True):
    """An array of videos in a .npy file -> HDF5.

    All videos go to `split`, except that `val_frac` / `test_frac` of them (the LAST ones,
    in file order, so the result is reproducible) go to 'val' / 'test'.
    """
    array = _load_npy(input, mmap_mode="r")  # memory-mapped: large files stream
    layout = layout or DEFAULT_LAYOUT.get(array.ndim)
    if layout is None:
        raise DataError(f"{input} has shape {array.shape}; expected 4-D or 5-D videos: pass "
                        f"--layout naming each axis")
    videos = _to_nthwc(array, layout)
    if videos.shape[-1] not in (1, 3):
        raise DataError(f"{input}: {videos.shape[-1]} channels; need 1 (gray) or 3 (RGB): "
                        f"check --layout")
    to_uint8 = _uint8_converter(array)

    def load(n):
        video = _rgb(to_uint8(videos[n]))
        return _resize_video(video, image_size) if image_size else video

    write_videos(out, _fraction_splits(len(videos), split, val_frac, test_frac, load),
                 force, progress)


def _fraction_counts(count, val_frac, test_frac, what="videos"):
    """(n_val, n_test) for `count` videos (or other `what`); every split asked for gets at
    least one."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(f"--val_frac {val_frac} and --test_frac {test_frac} must lie in [0, 1) "
                        f"and sum to less than 1")
    n_val, n_test = round(count * val_frac), round(count * test_frac)
    n_main = count - n_val - n_test
    if n_main < 1 or (val_frac > 0 and n_val < 1) or (test_frac > 0 and n_test < 1):
        raise DataError(f"{count} {what} cannot be split with --val_frac {val_frac} and "
                        f"--test_frac {test_frac}; every split needs at least one")
    return n_val, n_test


def _fraction_splits(count, split, val_frac, test_frac, load):
    """{name: lazy videos}: the last val_frac + test_frac of `count` videos go to val, test."""
    n_val, n_test = _fraction_counts(count, val_frac, test_frac)
    n_main = count - n_val - n_test
    if (split == "val" and n_val) or (split == "test" and n_test):
        raise DataError(f"--split {split} clashes with --{split}_frac; pick another --split")
    bounds = [(split, 0, n_main), ("val", n_main, n_main + n_val),
              ("test", n_main + n_val, count)]
    return {name: _LazyVideos(range(a, b), load) for name, a, b in bounds if b > a}


# ---------------------------------------------------------------------------------------
# videos: video files (.mp4, .avi, ...) -> HDF5, and read_clip for one clip to predict from
# ---------------------------------------------------------------------------------------
# Decoding uses PyAV: its wheels bundle FFmpeg, so every container and codec here (KTH's
# .avi, CLEVRER's .mp4, phones' H.264/HEVC .mov) decodes with one pip install and no system
# FFmpeg; imageio's video plugins wrap PyAV or an ffmpeg binary anyway, and opencv is a far
# larger wheel whose decoding depends on how it was built.

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class _BadVideo(DataError):
    """A video file that cannot be decoded (`videos --skip-bad` skips these)."""


def _av():
    """The PyAV module, or a DataError naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise DataError('reading video files needs PyAV, which is not installed: run '
                        'pip install -e ".[video]" (or pip install av)') from None
    return av


def _upright(frame):
    """A decoded frame as a PIL RGB image the way players show it: phones store portrait
    video as landscape frames plus a display rotation, which decoders do not apply."""
    from PIL import Image

    image = frame.to_image()
    # `rotation`: degrees counterclockwise, e.g. -90 for a phone held upright
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_270}.get(round(getattr(frame, "rotation", 0)) % 360)
    return image.transpose(turn) if turn is not None else image


CROPS = ("squeeze", "center", "tiles")


def _windows(width, height, crop):
    """The boxes (left, top, right, bottom) that `crop` cuts from a width x height frame.
    squeeze: the whole frame (`_fit` squeezes it to a square, as the official converter does);
    center: the central square; tiles: ceil(long / short) squares of the short side spread
    evenly along the long side, the first at one end and the last at the other (they overlap
    unless the long side is a multiple of the short one), in order from left or top."""
    if crop == "squeeze":
        return [(0, 0, width, height)]
    side, spare = min(width, height), abs(width - height)
    if crop == "center":
        offsets = [spare // 2]
    else:
        count = -(-max(width, height) // side)  # ceil
        offsets = [round(k * spare / max(count - 1, 1)) for k in range(count)]
    return [(o, 0, o + side, side) if width > height else (0, o, side, o + side)
            for o in offsets]


def _decode(path, size, every=1, max_frames=None, crop="squeeze"):
    """Frames 0, every, 2*every, ... (at most max_frames) of a video file, each cut into
    the windows of `crop` (`_windows`) and fitted by `_fit`: uint8 (K, T, size, size, 3),
    one video per window (K = 1 but for tiles)."""
    av = _av()
    frames, boxes = [], None
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if streams:
                streams[0].thread_type = "AUTO"  # frame- and slice-threaded decoding
                for t, frame in enumerate(container.decode(streams[0])):
                    if max_frames is not None and len(frames) >= max_frames:
                        break  # the rest of a long video is not needed: stop decoding
                    if t % every == 0:
                        image = _upright(frame)
                        boxes = boxes or _windows(*image.size, crop)
                        frames.append([_fit(image if box == (0, 0, *image.size) else
                                            image.crop(box), size) for box in boxes])
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        reason = getattr(e, "strerror", None) or str(e)  # FFmpeg's text, without the path
        raise _BadVideo(f"cannot decode {path} ({reason}); the file is damaged or not a video: "
                        f"re-encode or remove it") from None
    if not streams:
        raise _BadVideo(f"{path} has no video stream; remove it or pass a video file")
    if not frames:
        raise _BadVideo(f"{path} decodes to no frames; re-encode or remove it")
    return np.stack(frames, axis=1)  # (T, K, ...) -> (K, T, size, size, 3)


def _natural_path_key(path, root):
    """Natural order of paths below `root`, folder by folder."""
    return [_natural_key(Path(part)) for part in path.relative_to(root).parts]


def _video_files(folder, where, fix):
    """Video files anywhere below `folder`, in natural path order; none is an error (in
    `where`, saying `fix`). Hidden files are left out: macOS writes `._name.mp4` companions
    that are not videos."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS
             and p.is_file() and not any(part.startswith(".") for part in
                                         p.relative_to(folder).parts)]
    if not files:
        raise DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {where}; {fix}")
    return sorted(files, key=lambda p: _natural_path_key(p, folder))


def _group_matcher(text, flag):
    """A predicate on group ids from '17-25' / '1,3,5-7' / 'alice,bob': integer ranges and
    single ids; ids compare as integers when both sides are integers ('01' is 1)."""
    ranges, names = [], set()
    for item in (part.strip() for part in text.split(",")):
        bounds = re.fullmatch(r"(\d+)-(\d+)", item)
        if bounds:
            low, high = int(bounds[1]), int(bounds[2])
            if low > high:
                raise DataError(f"--{flag} {text}: range {item} is empty; write low-high")
            ranges.append((low, high))
        elif item:
            names.add(item)
        else:
            raise DataError(f"--{flag} '{text}' has an empty item; write e.g. 17-25 or 1,3,5-7")
    numbers = {int(n) for n in names if n.isdecimal()}

    def matches(group):
        if group.isdecimal():
            return int(group) in numbers or any(a <= int(group) <= b for a, b in ranges)
        return group in names
    return matches


def _groups_text(groups):
    """Group ids for a message: sorted, integers numerically, at most 20."""
    ordered = sorted(groups, key=lambda g: (not g.isdecimal(), int(g) if g.isdecimal() else 0,
                                            g))
    return ", ".join(ordered[:20]) + (", ..." if len(ordered) > 20 else "")


def _split_by_regex(files, regex, val_groups, test_groups):
    """{split: files}: group 1 of `regex` searched in each file NAME is the file's group id;
    files whose group is in test_groups go to test, in val_groups to val, others to train."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise DataError(f"--split_by {regex!r} is not a valid regular expression ({e})") from None
    if pattern.groups < 1:
        raise DataError(f"--split_by {regex!r} has no capturing group; put the group id in "
                        r"parentheses, e.g. 'person(\d+)'")
    if not (val_groups or test_groups):
        raise DataError("--split_by needs --test_groups and/or --val_groups naming the groups "
                        "that leave train, e.g. --test_groups 17-25")
    in_test = _group_matcher(test_groups, "test_groups") if test_groups else lambda g: False
    in_val = _group_matcher(val_groups, "val_groups") if val_groups else lambda g: False
    splits, seen = {"train": [], "val": [], "test": []}, set()
    for file in files:
        match = pattern.search(file.name)
        if match is None or match.group(1) is None:
            raise DataError(f"file name {file.name} does not match --split_by {regex!r}; fix "
                            f"the expression or move the file out of the folder")
        group = match.group(1)
        seen.add(group)
        if in_test(group) and in_val(group):
            raise DataError(f"group {group} is in both --val_groups and --test_groups; "
                            f"give each group one split")
        splits["test" if in_test(group) else "val" if in_val(group) else "train"].append(file)
    for name, given in (("test", test_groups), ("val", val_groups), ("train", True)):
        if given and not splits[name]:
            raise DataError(f"no file falls in {name} (groups found: {_groups_text(seen)}); "
                            f"check --split_by, --val_groups and --test_groups")
    return {name: videos for name, videos in splits.items() if videos}


def _split_by_fraction(files, root, val_frac, test_frac, what="videos"):
    """{split: files}: `val_frac` / `test_frac` of the files go to val / test, chosen by a
    hash of each file's path below `root`. Deterministic on any machine, and it mixes
    subfolders (the last files by name would all come from one folder). Each split keeps
    natural name order; `what` names the files in an error."""
    import hashlib

    n_val, n_test = _fraction_counts(len(files), val_frac, test_frac, what)
    ranked = sorted(files, key=lambda p: hashlib.sha1(
        p.relative_to(root).as_posix().encode()).hexdigest())
    held = {"val": set(ranked[:n_val]), "test": set(ranked[n_val:n_val + n_test])}
    splits = {"train": [p for p in files if p not in held["val"] and p not in held["test"]],
              "val": [p for p in files if p in held["val"]],
              "test": [p for p in files if p in held["test"]]}
    return {name: videos for name, videos in splits.items() if videos}


DEFAULT_GAP = 8  # kept frames dropped before val and before test: ~1/3 s of 25 fps video


def _time_fractions(time_split):
    """--time_split as (train, val) fractions: 'F' (or the number F) -> (F, 0), no val;
    'F,V' (or (F, V)) -> (F, V). Test gets the rest."""
    given = time_split if isinstance(time_split, str) else ",".join(
        map(str, np.atleast_1d(time_split)))
    try:
        parts = [float(part) for part in given.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(0 < p < 1 for p in parts) or sum(parts) >= 1:
        raise DataError(f"--time_split {given} must be F or F,V with F (train) and V (val) in "
                        f"(0, 1) summing to less than 1, the rest test: e.g. 0.7,0.15")
    return parts[0], (parts[1] if len(parts) == 2 else 0.0)


def _time_bounds(frames, fractions, gap):
    """{split: (start, stop)}: the frame ranges of one video of `frames` kept frames split
    in time. Fractions (train, val) of the frames, rounded half up, give the cuts; the
    first `gap` frames after each cut are dropped, so neighbouring frames, which are nearly
    the same, never sit on both sides of a cut. No val part when val is 0. A part whose
    gap leaves no frames has start >= stop."""
    train, val = fractions
    cuts = [int(f * frames + 0.5) for f in ((train, train + val) if val else (train,))]
    edges = [0, *cuts, frames]
    names = ("train", "val", "test") if val else ("train", "test")
    return {name: (edges[k] + (gap if k else 0), edges[k + 1]) for k, name in enumerate(names)}


def _pieces(split, windows, start, stop, length):
    """(split, video) pairs of frames start..stop of each window of a decoded file
    (K, T, ...): train keeps them as one video; val and test are cut into consecutive
    videos of `length` frames (None: one video), a shorter end left out."""
    size = stop - start if split == "train" or not length else length
    starts = range(start, stop - size + 1, size) if size > 0 else []
    return [(split, w[a:a + size]) for w in windows for a in starts]


def _time_pieces(windows, fractions, length, gap):
    """(split, video) pairs of one decoded file split in time (`_time_bounds`, `_pieces`)."""
    bounds = _time_bounds(windows.shape[1], fractions, gap)
    return [piece for split, (start, stop) in bounds.items()
            for piece in _pieces(split, windows, start, stop, length)]


def _check_video_options(image_size, every, max_frames, crop, time_split, test_length, gap):
    """Fail on bad options before any work; returns (train, val) fractions of a time split
    (None without one) and its gap."""
    if every < 1 or (max_frames is not None and max_frames < 1) or image_size < 1:
        raise DataError(f"--every, --max_frames and --image_size must be at least 1; got "
                        f"{every}, {max_frames} and {image_size}")
    if crop not in CROPS:
        raise DataError(f"unknown --crop {crop!r}; use one of {', '.join(CROPS)}")
    if gap is not None and time_split is None:
        raise DataError(f"--gap {gap} applies to a time split: pass --time_split too")
    if test_length is not None and test_length < 1:
        raise DataError(f"--test_length {test_length} must be at least 1: the frames of "
                        f"each val and test video")
    if gap is not None and gap < 0:
        raise DataError(f"--gap {gap} must be at least 0: the frames dropped at each cut")
    if time_split is None:
        return None, None
    return _time_fractions(time_split), DEFAULT_GAP if gap is None else gap


def _split_files(data_dir, val_frac, test_frac, split_by, val_groups, test_groups, time_split):
    """{split: files}: by split folders, --split_by, fractions, or all in train (time split
    too: every file goes to both splits, each in part)."""
    split_dirs = [s for s in SPLITS if (data_dir / s).is_dir()]
    file_split = split_by or val_groups or test_groups or val_frac or test_frac
    if time_split is not None and (split_dirs or file_split):
        raise DataError(f"--time_split splits every video in time, so it takes no other split: "
                        f"drop the split folders of {data_dir} and --split_by/--*_groups/"
                        f"--*_frac")
    if split_dirs:
        if file_split:
            raise DataError(f"{data_dir} has split folders ({', '.join(split_dirs)}), which fix "
                            f"the splits; drop --split_by/--*_groups/--*_frac or use a flat folder")
        return {s: _video_files(data_dir / s, data_dir / s, "add videos or remove the folder")
                for s in split_dirs}
    found = _video_files(data_dir, f"{data_dir} or its subfolders",
                         "pass the folder that holds the videos")
    if split_by:
        if val_frac or test_frac:
            raise DataError("--split_by and --val_frac/--test_frac both split the files; "
                            "pass one of them")
        return _split_by_regex(found, split_by, val_groups, test_groups)
    if val_groups or test_groups:
        raise DataError("--val_groups/--test_groups need --split_by REGEX to find each "
                        "file's group")
    return _split_by_fraction(found, data_dir, val_frac, test_frac)


def convert_videos(data_dir, out, image_size, every=1, max_frames=None, val_frac=0.0,
                   test_frac=0.0, split_by=None, val_groups=None, test_groups=None,
                   skip_bad=False, force=False, progress=True, crop="squeeze", time_split=None,
                   test_length=None, gap=None):
    """Video files below `data_dir` -> one HDF5 file; returns ({split: videos written},
    [skipped files]).

    Splits: from data_dir/{train,val,test}/ when those folders exist, else from one flat
    folder (searched recursively) by `split_by` (a regex on file names, see
    `_split_by_regex`) or by `val_frac` / `test_frac` (see `_split_by_fraction`); with
    neither, everything goes to train. Or, alone, `time_split` 'F,V' (or F): every video
    split in time, its first F of the frames to train, the next V to val, the rest to test,
    `gap` frames (default DEFAULT_GAP) dropped at each cut (`_time_bounds`). With any
    split, val and test videos are cut into consecutive videos of `test_length` frames
    (`_pieces`). Every `every`-th frame is kept, at most `max_frames` per video, each cut
    by `crop` (`_windows`: tiles make several videos of one file) and resized by `_fit`.
    Each file is decoded once; its videos are written in file order.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a directory; pass --data_dir holding video files")
    fractions, gap = _check_video_options(image_size, every, max_frames, crop, time_split,
                                          test_length, gap)
    files = _split_files(data_dir, val_frac, test_frac, split_by, val_groups, test_groups,
                         time_split)
    _av()  # fail now, not at the first file, when PyAV is missing
    given = {"time_split": fractions and ",".join(f"{x:g}" for x in fractions if x),
             "gap": gap, "test_length": test_length}
    attrs = {"kind": "videos", "crop": crop, **{k: v for k, v in given.items() if v is not None}}
    skipped, decoded, writers = [], dict.fromkeys(files, 0), {}
    jobs = [(split, path) for split, group in files.items() for path in group]
    with _new_file(out, force, attrs) as f:
        for split, path in tqdm(jobs, desc="converting", unit="file", disable=not progress):
            try:
                windows = _decode(path, image_size, every, max_frames, crop)
            except _BadVideo as e:
                if not skip_bad:
                    raise _BadVideo(f"{e}, or pass --skip-bad to skip such files") from None
                skipped.append(str(path))
                continue
            decoded[split] += 1
            pieces = (_pieces(split, windows, 0, windows.shape[1], test_length)
                      if fractions is None else _time_pieces(windows, fractions, test_length,
                                                             gap))
            for name, video in pieces:
                if name not in writers:
                    writers[name] = _SplitWriter(f, name)
                writers[name].add(video)
        for split, count in decoded.items():
            if not count:
                raise DataError(f"none of the {len(files[split])} files of split '{split}' "
                                f"could be decoded; check the files")
        _check_parts(writers, files if fractions is None else
                     SPLITS if fractions[1] else ("train", "test"), attrs)
        counts = {name: len(w.lengths) for name, w in writers.items()}
    return counts, skipped


def _check_parts(writers, splits, attrs):
    """Fail unless each of `splits` got a video (val and test clips need frames enough)."""
    for name in splits:
        if name not in writers:
            given = ", ".join(f"--{k} {attrs[k]}" for k in ("time_split", "gap", "test_length")
                              if k in attrs)
            raise DataError(f"no video has frames enough for a {name} video with {given}; use "
                            f"longer videos or lower values")


def read_clip(path, image_size, channels=3, crop="squeeze"):
    """ONE clip to predict from -> uint8 RGB (T, image_size, image_size, 3).

    `path`: a folder of frame images (taken in natural name order: 2.png before 10.png),
    a .npy array (T, H, W) or (T, H, W, C) with C in 1, 3, 4, uint8 or float in [0, 1],
    or a video file (.mp4, .avi, .mkv, .webm, .mov, .gif; needs PyAV). Frames are resized
    by the same rule as the `frames`, `npy` and `videos` subcommands (`_fit`), so a clip
    looks like the training data; `crop` "center" cuts the central square first, as
    `videos --crop center` (or `tiles`, whose windows are squares of the short side) did for
    the training data. `channels`: 3, the only value the format has (C = 3).
    """
    if crop not in ("squeeze", "center"):
        raise DataError(f"a clip is cut by --crop squeeze or center, got {crop!r}")
    if channels != 3:
        raise DataError(f"frames are RGB (C = 3), got channels={channels}")
    if image_size < 1:
        raise DataError(f"image size must be at least 1, got {image_size}")
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.startswith(".")), key=_natural_key)
        if not files:
            raise DataError(f"{path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"pass a folder of frames, a .npy file or a video file")
        return np.stack([_load_image(p, image_size, crop) for p in files])
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a folder of frames, a .npy file or a "
                        f"video file")
    if path.suffix.lower() == ".npy":
        return _npy_clip(path, image_size, crop)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return _decode(path, image_size, crop=crop)[0]
    raise DataError(f"{path}: unknown kind of clip; pass a folder of frame images, a .npy "
                    f"file or a video file ({', '.join(VIDEO_EXTENSIONS)})")


def _npy_clip(path, size, crop="squeeze"):
    """A .npy clip (T, H, W[, C]) -> RGB frames, the window of `crop` fitted by `_fit`,
    (T, size, size, 3)."""
    array = _load_npy(path)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or not len(array):
        raise DataError(f"{path} has shape {array.shape}; a clip is (T, H, W) or (T, H, W, C) "
                        f"with C = 1, 3 or 4 and T >= 1")
    left, top, right, bottom = _windows(array.shape[2], array.shape[1], crop)[0]
    array = array[:, top:bottom, left:right]
    return _resize_video(_rgb(_uint8_converter(array)(array)), size)


# ---------------------------------------------------------------------------------------
# synthetic: bouncing balls
# ---------------------------------------------------------------------------------------
# Balls move at constant velocity between collisions, so two past frames fix the future
# up to collisions: the demo task a video predictor must learn. Sizes and speeds below are
# for a 32-pixel frame and scale with the frame size.

PALETTE = np.array([[255, 64, 64], [64, 255, 64], [80, 128, 255], [255, 230, 50],
                    [255, 64, 255], [64, 255, 255], [255, 150, 30], [255, 255, 255]], np.float32)
RADIUS = (3.0, 5.0)  # px at size 32
SPEED = (1.0, 2.5)   # px per frame at size 32
MAX_STEP = 0.25      # px a ball may move per simulation sub-step


def bouncing_balls(num_videos, frames, size, seed, max_balls=3, speed=1.0):
    """Render `num_videos` videos of 1..max_balls colored balls on black. `speed` scales
    every ball's speed (0.25: a slowly changing data set; the same seed draws the same
    scenes at any speed).

    Returns (videos, state): videos uint8 (N, T, S, S, 3), and state, a dict of
    pos (N, T, B, 2) ball centres (x, y) in pixels, vel (N, T, B, 2) in pixels per frame,
    radius (N, B), color (N, B, 3), active (N, B) bool; B = max_balls, and ball b of
    video n exists only where active[n, b] (videos have different ball counts).
    """
    _check_scene(num_videos, frames, size, max_balls, "--max_balls")
    if not 0 < speed <= 10:
        raise DataError(f"--speed {speed} out of range; use a factor in (0, 10], 1 = default")
    rng = np.random.default_rng(seed)
    scale = size / 32
    active = np.arange(max_balls) < rng.integers(1, max_balls + 1, num_videos)[:, None]
    radius = rng.uniform(*RADIUS, (num_videos, max_balls)) * scale * active  # (N, B)
    pos = _place_balls(rng, radius, active, size)                             # (N, B, 2)
    angle = rng.uniform(0, 2 * np.pi, (num_videos, max_balls))
    ball_speed = rng.uniform(*SPEED, (num_videos, max_balls)) * scale * speed * active
    vel = np.stack([np.cos(angle), np.sin(angle)], -1) * ball_speed[..., None]  # (N, B, 2)
    color = _colors(rng, num_videos, max_balls)                               # (N, B, 3)
    # Equal masses share kinetic energy, so no ball can exceed sqrt(B) times the top speed.
    substeps = int(np.ceil(SPEED[1] * scale * speed * np.sqrt(max_balls) / MAX_STEP))
    pos, vel = _simulate(pos, vel, radius, active, frames, size, substeps)
    videos = _render(pos, radius, color, active, size)
    return videos, dict(pos=pos, vel=vel, radius=radius, color=color, active=active)


def _check_scene(num_videos, frames, size, count, flag):
    """The sizes both synthetic kinds need; `count` objects (balls, blocks) per video at most."""
    if not 1 <= count <= len(PALETTE):
        raise DataError(f"{flag} {count} out of range; use 1..{len(PALETTE)}")
    if size < 16 or frames < 1 or num_videos < 1:
        raise DataError(f"need --size >= 16, --frames >= 1 and --videos >= 1; got size {size}, "
                        f"frames {frames}, videos {num_videos}")


def _colors(rng, num_videos, count):
    """(N, count, 3) float32: distinct palette colours per video."""
    palette_order = np.argsort(rng.random((num_videos, len(PALETTE))), axis=1)
    return PALETTE[palette_order[:, :count]]


def _place(placed, active, propose, clash, what, size, tries=1000):
    """Rejection sampling of B objects in N videos, object by object, into `placed`
    (N, B, ...): `propose(todo, b)` -> where object b goes in the videos of mask `todo`;
    `clash(placed, b)` -> (N, b) bool, object b overlaps an earlier one. Objects exist only
    where active (N, B). Returns `placed`; `what` and `size` are for the error message."""
    count = active.shape[1]
    for b in range(count):
        todo = active[:, b].copy()
        for _ in range(tries):
            if not todo.any():
                break
            placed[todo, b] = propose(todo, b)
            todo = active[:, b] & (clash(placed, b) & active[:, :b]).any(1)
        if todo.any():
            raise DataError(f"cannot place {count} {what} apart in {size}x{size} frames; use a "
                            f"larger --size or fewer {what}")
    return placed


def _place_balls(rng, radius, active, size, gap=1.0):
    """Random centres (N, B, 2), balls fully inside the frame and at least `gap` px apart."""
    def propose(todo, b):
        r = radius[todo, b, None]
        return r + rng.random((todo.sum(), 2)) * (size - 2 * r)

    def clash(pos, b):
        apart = (np.linalg.norm(pos[:, b, None] - pos[:, :b], axis=-1)  # (N, b)
                 - radius[:, b, None] - radius[:, :b])
        return apart < gap
    return _place(np.zeros((*active.shape, 2)), active, propose, clash, "balls", size)


def _simulate(pos, vel, radius, active, frames, size, substeps):
    """Advance all videos at once; return per-frame pos and vel, (N, T, B, 2) each."""
    pos, vel = pos.copy(), vel.copy()
    num_videos, max_balls = radius.shape
    pairs = [(i, j) for i in range(max_balls) for j in range(i + 1, max_balls)]
    out_pos = np.empty((num_videos, frames, max_balls, 2))
    out_vel = np.empty_like(out_pos)
    out_pos[:, 0], out_vel[:, 0] = pos, vel
    for t in range(1, frames):
        for _ in range(substeps):
            pos += vel / substeps
            _bounce_walls(pos, vel, radius, size)
            for i, j in pairs:
                _collide(pos, vel, radius, active, i, j)
        out_pos[:, t], out_vel[:, t] = pos, vel
    return out_pos, out_vel


def _bounce_walls(pos, vel, radius, size):
    """Mirror a ball that crossed a wall back inside; flip that velocity component."""
    low, high = radius[..., None], size - radius[..., None]  # allowed centre range
    below, above = pos < low, pos > high
    pos[:] = np.where(below, 2 * low - pos, np.where(above, 2 * high - pos, pos))
    vel[:] = np.where(below, np.abs(vel), np.where(above, -np.abs(vel), vel))


def _collide(pos, vel, radius, active, i, j):
    """Elastic collision of balls i and j (equal masses) where they touch and approach."""
    delta = pos[:, j] - pos[:, i]                                  # (N, 2)
    dist = np.linalg.norm(delta, axis=-1)                          # (N,)
    normal = delta / np.maximum(dist, 1e-9)[:, None]
    closing = ((vel[:, j] - vel[:, i]) * normal).sum(-1)           # < 0: approaching
    hit = active[:, i] & active[:, j] & (dist < radius[:, i] + radius[:, j]) & (closing < 0)
    # equal masses swap the velocity components along the line of centres
    swap = (closing * hit)[:, None] * normal
    vel[:, i] += swap
    vel[:, j] -= swap


def _render(pos, radius, color, active, size, chunk=64):
    """Anti-aliased discs: coverage falls from 1 to 0 over one pixel across the edge,
    so sub-pixel motion changes the image. Overlapping balls add their light (overlaps
    are brief: balls bounce on contact). Returns uint8 (N, T, S, S, 3)."""
    num_videos, frames, max_balls, _ = pos.shape
    centres = np.arange(size, dtype=np.float32) + 0.5                 # pixel centres
    r = radius.astype(np.float32)[:, None, :, None, None]            # (N, 1, B, 1, 1)
    on = active[:, None, :, None, None]                               # (N, 1, B, 1, 1)
    videos = np.empty((num_videos, frames, size, size, 3), np.uint8)
    for a in range(0, num_videos, chunk):
        p = pos[a:a + chunk].astype(np.float32)                        # (n, T, B, 2)
        dx = centres - p[..., 0, None]                                 # (n, T, B, W)
        dy = centres - p[..., 1, None]                                 # (n, T, B, H)
        dist = np.sqrt(dy[..., :, None] ** 2 + dx[..., None, :] ** 2)  # (n, T, B, H, W)
        alpha = np.clip(r[a:a + chunk] - dist + 0.5, 0, 1) * on[a:a + chunk]
        # sum over balls of coverage x colour: (n, T, H, W, B) @ (n, 1, B, 3) -> (n, T, H, W, 3)
        image = np.moveaxis(alpha, 2, -1) @ color[a:a + chunk, None, None]
        videos[a:a + chunk] = np.round(np.minimum(image, 255))
    return videos


# ---------------------------------------------------------------------------------------
# synthetic: a bar sweeping over still blocks, where an older frame matters
# ---------------------------------------------------------------------------------------
# On bouncing balls the last two frames fix the next one. Here they do not: a grey bar
# sweeps back and forth over still colored blocks and hides each in turn; the frame in
# which a hidden block comes back out cannot be told from the two before it (they show
# only the bar there), and any older frame that showed the block shows it exactly. The
# bar itself is the visible clock that keeps a long rollout in step.
# Geometry on a grid of cells CELL px wide: the bar moves one cell per frame, and blocks
# are one cell wide and sit on the grid, so a block comes out WHOLE in one frame (16-40 px
# at size 32, not a sliver): a prediction perfect but for leaving the block out scores
# about 18 dB PSNR on such a frame, so recalling it is worth many dB.

CELL = 4                 # px at size 32
BAR_CELLS = 3            # bar width: a block stays hidden whole for 3 frames of a pass
BLOCK_HEIGHT = (4, 10)   # px at size 32
BAR_GREY = 128


def occluded_blocks(num_videos, frames, size, seed, max_blocks=3):
    """Render `num_videos` videos of 1..max_blocks still colored blocks on black, and a grey
    bar, full height, sweeping over them at one cell per frame and turning back at the sides.

    The property (tested): frame t is a MEMORY FRAME when a block that was hidden whole in
    frames t-1 and t-2 shows at t, and some frame before t-2 showed it whole. Frames t-1 and
    t-2 are then pixel for pixel those of the same scene without that block, while frame t
    is not: the last two frames cannot tell what comes out, one older frame can (blocks
    never move). The bar is predictable from the last two frames: constant speed, turning
    points it reaches exactly, and at least one cell of it always in view.

    Returns (videos, state): videos uint8 (N, T, S, S, 3), and state, a dict of
    bar (N, T) int, the bar's left edge in px (negative while partly off the left side),
    bar_width and cell (int, px), boxes (N, B, 4) int blocks (x0, y0, x1, y1),
    color (N, B, 3) uint8, active (N, B) bool (block b of video n exists), memory (N, T)
    bool; B = max_blocks.
    """
    _check_scene(num_videos, frames, size, max_blocks, "max_blocks")
    rng = np.random.default_rng(seed)
    cell = round(CELL * size / 32)
    cells = size // cell                                   # block columns
    active = np.arange(max_blocks) < rng.integers(1, max_blocks + 1, num_videos)[:, None]
    height = rng.integers(round(BLOCK_HEIGHT[0] * size / 32),
                          round(BLOCK_HEIGHT[1] * size / 32) + 1, (num_videos, max_blocks))
    boxes = _place_blocks(rng, height, active, cell, cells, size)
    color = _colors(rng, num_videos, max_blocks).astype(np.uint8)

    # The bar's left edge steps one cell a frame between -(BAR_CELLS-1) and cells-1 (in
    # cells) and back: a triangle wave, so one cell of the bar is always in view and every
    # block column can be hidden whole.
    low, high = -(BAR_CELLS - 1), cells - 1
    period = 2 * (high - low)
    u = (rng.integers(0, period, num_videos)[:, None] + np.arange(frames)) % period
    bar = (low + np.where(u <= high - low, u, period - u)) * cell   # (N, T) px
    width = BAR_CELLS * cell

    columns = np.arange(size)
    covered = (columns >= bar[..., None]) & (columns < bar[..., None] + width)  # (N, T, S)
    videos = np.where(covered[:, :, None, :, None], np.uint8(BAR_GREY),
                      _paint_blocks(boxes, color, active, size)[:, None])
    memory = _memory_frames(covered, boxes, active)
    return videos, dict(bar=bar, bar_width=width, cell=cell, boxes=boxes, color=color,
                        active=active, memory=memory)


def _place_blocks(rng, height, active, cell, cells, size, gap=1):
    """Random boxes (x0, y0, x1, y1), (N, B, 4): one cell wide on the cell grid, at least
    `gap` px apart (blocks in one column stack with a gap; neighbouring columns never touch)."""
    def propose(todo, b):
        x0 = rng.integers(0, cells, todo.sum()) * cell
        y0 = rng.integers(0, size - height[todo, b] + 1)
        return np.stack([x0, y0, x0 + cell, y0 + height[todo, b]], axis=1)

    def clash(boxes, b):
        low, high = boxes[:, b, None, :2], boxes[:, b, None, 2:]          # (N, 1, 2)
        # a column apart, or in one column and `gap` rows apart
        apart = (low[..., 0] != boxes[:, :b, 0]) | (
            (low[..., 1] >= boxes[:, :b, 3] + gap) | (boxes[:, :b, 1] >= high[..., 1] + gap))
        return ~apart
    return _place(np.zeros((*active.shape, 4), int), active, propose, clash, "blocks", size)


def _paint_blocks(boxes, color, active, size):
    """The still scene, uint8 (N, S, S, 3): the blocks on black."""
    scene = np.zeros((len(boxes), size, size, 3), np.uint8)
    for n, b in zip(*np.nonzero(active)):
        x0, y0, x1, y1 = boxes[n, b]
        scene[n, y0:y1, x0:x1] = color[n, b]
    return scene


def _memory_frames(covered, boxes, active):
    """(N, T) bool: a block hidden whole at t-1 and t-2 shows at t and was seen whole
    before t-2. The bar spans the full height, so columns decide what is hidden."""
    columns = np.arange(covered.shape[-1])
    inside = (columns >= boxes[..., 0, None]) & (columns < boxes[..., 2, None])  # (N, B, S)
    inside, bar = inside[:, None], covered[:, :, None]          # (N, 1, B, S), (N, T, 1, S)
    hidden = ~(inside & ~bar).any(-1)                           # (N, T, B) no column shows
    whole = ~(inside & bar).any(-1)                             # (N, T, B) every column shows
    seen = np.logical_or.accumulate(whole, axis=1)              # seen whole at or before t
    memory = np.zeros(hidden.shape, bool)
    memory[:, 3:] = ~hidden[:, 3:] & hidden[:, 2:-1] & hidden[:, 1:-2] & seen[:, :-3]
    return (memory & active[:, None]).any(-1)


SYNTHETIC_KINDS = ("balls", "occluder")


def write_synthetic(out, videos=1000, frames=32, size=32, seed=0, max_balls=3, force=False,
                    kind="balls", speed=1.0):
    """A built-in synthetic data set, split 80/10/10, written to `out`.

    kind 'balls': `bouncing_balls` (max_balls, speed apply). kind 'occluder':
    `occluded_blocks`, where an older frame matters; its per-frame memory flags are stored
    too (read them with `memory_flags`). The root attribute `kind` records which.
    """
    if kind not in SYNTHETIC_KINDS:
        raise DataError(f"unknown --kind {kind!r}; use one of {', '.join(SYNTHETIC_KINDS)}")
    _check_out(out, force)  # fail before generating
    if kind == "balls":
        clips, _ = bouncing_balls(videos, frames, size, seed, max_balls, speed)
        write_videos(out, _synthetic_splits(clips), force,
                     attrs={"kind": kind, "seed": seed, "speed": speed})
    else:
        clips, state = occluded_blocks(videos, frames, size, seed)
        write_videos(out, _synthetic_splits(clips), force, attrs={"kind": kind, "seed": seed},
                     memory=_synthetic_splits(state["memory"]))


def _synthetic_splits(videos):
    """80/10/10 train/val/test in video order, each split at least one video."""
    count = len(videos)
    if count < 3:
        raise DataError(f"--videos {count} is too few; need at least 3 (train, val, test)")
    n_held = max(1, round(count * 0.1))
    return {"train": videos[:count - 2 * n_held], "val": videos[count - 2 * n_held:count - n_held],
            "test": videos[count - n_held:]}


# ---------------------------------------------------------------------------------------
# camera: a virtual camera moving over photographs
# ---------------------------------------------------------------------------------------
# Real texture in motion that two frames predict: a camera pans over a photograph at a
# constant velocity, zooms at a constant rate, or moves sideways past two layers (a
# foreground cut from one photo slides over a background photo at a different speed:
# parallax). Every frame is a window of the photo at a sub-pixel position, resampled with
# LANCZOS over the whole window (`render_boxes`), so fine texture averages out as a real
# camera's pixels would and does not alias. Splits are by photograph: no photo is in two
# splits, so val and test show unseen scenes (the across-scene measure).
# Sizes are in frame pixels at 32x32 and scale with the frame size.

CAMERA_MOTIONS = ("pan", "zoom", "parallax", "mix")
VIEW = (0.25, 0.6)         # the view's side, a fraction of the photo's short side
PAN_SPEED = (0.5, 2.0)     # px per frame
ZOOM_RATE = (0.01, 0.03)   # the view's side changes by a factor exp(+-rate) a frame
DEPTH = (0.2, 0.6)         # parallax: the background moves at this fraction of the foreground
SKYLINE = (0.35, 0.65)     # parallax: the foreground's mean top edge, a fraction of the
                           # view down it (its waves add +-0.2: both layers always show)
MIN_SIDE = 4               # a photo's short side must be at least 4 frame sides (VIEW[0] = 1/4)
WORK_SIDE = 16             # photos are reduced to a short side of at most 16 frame sides


def _photo_files(folder):
    """Image files anywhere below `folder`, in natural path order, hidden ones left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory; pass --images holding photographs")
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and
             p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)]
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder} or its "
                        f"subfolders; pass the folder that holds the photographs")
    return sorted(files, key=lambda p: _natural_path_key(p, folder))


def load_photo(path, size):
    """A photograph as an RGB PIL image the way viewers show it (EXIF rotation applied),
    reduced with LANCZOS to a short side of at most WORK_SIDE * size: every view (at least
    VIEW[0] of the short side) is then still downsampled, never enlarged."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (WORK_SIDE * size,) * 2)  # JPEG: decode at a lower scale
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace or remove the file") from None
    short = min(image.size)
    if short < MIN_SIDE * size:
        raise DataError(f"{path} is {image.size[0]}x{image.size[1]}, too small for "
                        f"{size}x{size} frames (short side under {MIN_SIDE * size}); remove "
                        f"it or lower --image_size")
    scale = min(1.0, WORK_SIDE * size / short)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.LANCZOS)
    return image


def render_boxes(image, boxes, size):
    """The windows `boxes` (left, top, right, bottom; floats, sub-pixel) of a PIL image,
    each resampled to size x size with LANCZOS over the whole window (its filter widens
    with the window, so downsampling averages instead of aliasing): uint8 (T, size, size,
    C), no C axis for a one-band image."""
    from PIL import Image

    # a window that touches the photo's edge may overshoot it by a rounding error
    boxes = np.clip(boxes, 0, np.tile(image.size, 2))
    return np.stack([np.asarray(image.resize((size, size), Image.LANCZOS, box=tuple(box)))
                     for box in boxes])


def pan_boxes(corner, view, velocity, frames, size):
    """(T, 4) windows of side `view` (photo px) whose top left corner starts at `corner`
    and moves `velocity` (x, y) FRAME px per frame: the frames then translate by exactly
    -velocity px a frame."""
    # corner_t = corner + t * velocity * (view / size): frame px -> photo px
    step = np.asarray(velocity, float) * view / size
    corners = np.asarray(corner, float) + np.arange(frames)[:, None] * step    # (T, 2)
    return np.concatenate([corners, corners + view], axis=1)                  # (T, 4)


def zoom_boxes(centre, view, rate, frames):
    """(T, 4) square windows about `centre` whose side starts at `view` and changes by a
    factor exp(rate) a frame (rate > 0: zooming out, the view grows)."""
    half = view * np.exp(rate * np.arange(frames))[:, None] / 2               # (T, 1)
    return np.concatenate([np.subtract(centre, half), np.add(centre, half)], axis=1)


def _random_velocity(rng, size, sideways=False):
    """A velocity (x, y) in frame px per frame: a speed from PAN_SPEED, any direction
    (sideways: left or right)."""
    speed = rng.uniform(*PAN_SPEED) * size / 32
    angle = rng.choice([0, np.pi]) if sideways else rng.uniform(0, 2 * np.pi)
    return speed * np.array([np.cos(angle), np.sin(angle)])


def _random_pan(rng, photo, size, frames, velocity):
    """A pan at `velocity` (frame px per frame) over a (width, height) photo, the view's
    side drawn from VIEW: (boxes, velocity), slowed if the pan would leave the photo."""
    width, height = photo
    view = rng.uniform(*VIEW) * min(width, height)
    room = np.array([width, height]) - view
    travel = np.abs(velocity) * (frames - 1) * view / size                     # photo px
    velocity = velocity * min(1.0, *(room[travel > 0] / travel[travel > 0]))
    shift = velocity * (frames - 1) * view / size
    corner = np.maximum(0, -shift) + rng.random(2) * np.maximum(0, room - np.abs(shift))
    return pan_boxes(corner, view, velocity, frames, size), velocity


def _random_zoom(rng, photo, size, frames):
    """Zoom boxes: in or out at a rate from ZOOM_RATE (lowered when a long zoom would
    enlarge the photo), about a centre where the largest view fits."""
    width, height = photo
    largest = rng.uniform(*VIEW) * min(width, height)
    rate = min(rng.uniform(*ZOOM_RATE), np.log(largest / size) / max(frames - 1, 1))
    first = largest * np.exp(-rate * (frames - 1))
    centre = rng.uniform(largest / 2, np.array([width, height]) - largest / 2)
    zoom_out = rng.random() < 0.5
    return zoom_boxes(centre, first if zoom_out else largest, rate if zoom_out else -rate,
                      frames)


def _skyline(rng, image, top, view):
    """An 'L' mask of `image`, 255 below a wavy edge and 0 above: the foreground layer of a
    parallax. The edge is `top` (photo px) plus two sines of amplitude 0.03-0.1 and
    wavelength 0.3-1.5 of `view`, the side of the window that sees it."""
    from PIL import Image

    width, height = image.size
    x = np.arange(width)[:, None] + 0.5
    waves, lengths = rng.uniform(0.03, 0.1, 2) * view, rng.uniform(0.3, 1.5, 2) * view
    phases = rng.uniform(0, 2 * np.pi, 2)
    edge = top + (waves * np.sin(2 * np.pi * x / lengths + phases)).sum(1)         # (W,)
    below = np.arange(height)[:, None] + 0.5 > edge                               # (H, W)
    return Image.fromarray(below.astype(np.uint8) * 255)


def parallax_frames(back, front, far, near, mask, size):
    """Two layers: `front` through the windows `near`, where its 'L' `mask` is 255, over
    `back` through `far`. The mask is resampled as the photos are, so the edge between the
    layers is anti-aliased: uint8 (T, size, size, 3)."""
    alpha = render_boxes(mask, near, size)[..., None] / 255.0                  # (T, S, S, 1)
    mixed = alpha * render_boxes(front, near, size) + (1 - alpha) * render_boxes(back, far, size)
    return np.round(mixed).astype(np.uint8)


def _random_parallax(rng, back, front, size, frames):
    """A camera moving sideways past two layers (`parallax_frames`): the foreground, `front`
    below a wavy edge (`_skyline`) whose mean is SKYLINE of the way down the view, pans at
    a speed; the background, `back`, the same way at DEPTH of it."""
    near, velocity = _random_pan(rng, front.size, size, frames,
                                 _random_velocity(rng, size, sideways=True))
    far, _ = _random_pan(rng, back.size, size, frames, velocity * rng.uniform(*DEPTH))
    view = near[0, 3] - near[0, 1]
    mask = _skyline(rng, front, near[0, 1] + rng.uniform(*SKYLINE) * view, view)
    return parallax_frames(back, front, far, near, mask, size)


def camera_video(rng, photos, motion, size, frames):
    """One video of a camera over `photos` (PIL images from `load_photo`, those of one
    split): motion 'pan', 'zoom', 'parallax', or 'mix' (one of them at random). Returns
    (uint8 (T, size, size, 3), motion, indices of the photos used: [photo] or, for a
    parallax, [foreground, background], two photos when there are two)."""
    if motion == "mix":
        motion = CAMERA_MOTIONS[rng.integers(3)]
    picks = list(rng.choice(len(photos), 2, replace=len(photos) < 2))
    photo = photos[picks[0]]
    if motion == "pan":
        boxes, _ = _random_pan(rng, photo.size, size, frames, _random_velocity(rng, size))
    elif motion == "zoom":
        boxes = _random_zoom(rng, photo.size, size, frames)
    else:
        video = _random_parallax(rng, photos[picks[1]], photo, size, frames)
        return video, motion, picks
    return render_boxes(photo, boxes, size), motion, picks[:1]


def _camera_counts(videos, photo_splits):
    """{split: videos}: from 'TRAIN,VAL,TEST' counts, or one total N shared in proportion
    to the photos of each split (`photo_splits`: {split: photos}), each at least 1."""
    given = videos if isinstance(videos, str) else ",".join(map(str, np.atleast_1d(videos)))
    try:
        counts = [int(count) for count in given.split(",")]
    except ValueError:
        counts = []
    if len(counts) not in (1, 3) or min(counts, default=-1) < 0 or not counts[0]:
        raise DataError(f"--videos {given} must be a total N >= 1 or TRAIN,VAL,TEST counts, "
                        f"train at least 1: e.g. 600,60,60")
    if len(counts) == 1:
        total = sum(map(len, photo_splits.values()))
        counts = [max(1, round(counts[0] * len(photo_splits[s]) / total))
                  if s in photo_splits else 0 for s in SPLITS]
    for split, count in zip(SPLITS, counts):
        if count and split not in photo_splits:
            raise DataError(f"--videos asks for {count} {split} videos but no photograph is "
                            f"in {split}; pass --{split}_frac above 0 or ask for 0 videos")
    return {split: count for split, count in zip(SPLITS, counts) if count}


def write_camera(images, out, image_size=32, videos="600,60,60", frames=16, motion="mix",
                 val_frac=0.15, test_frac=0.15, seed=0, force=False, progress=True):
    """Videos of a virtual camera over the photographs below `images` -> HDF5; returns
    {split: videos written}.

    The photographs are split by a hash of each one's path below `images` (as `videos
    --val_frac` splits files): val_frac of them to val, test_frac to test, no photo in
    two splits. `videos`: 'TRAIN,VAL,TEST' counts or a total (`_camera_counts`). Video k
    of a split is `camera_video` drawn from seed, split and k alone, so a file is the same
    on every run. Also written: /sources/<split>, one line per video naming its motion and
    photos ('pan a.jpg', 'parallax a.jpg over b.jpg').
    """
    if motion not in CAMERA_MOTIONS:
        raise DataError(f"unknown --motion {motion!r}; use one of {', '.join(CAMERA_MOTIONS)}")
    if frames < 2 or image_size < 1 or seed < 0:
        raise DataError(f"need --frames >= 2, --image_size >= 1 and --seed >= 0; got "
                        f"{frames}, {image_size} and {seed}")
    _check_out(out, force)  # fail before loading photos
    files = _photo_files(images)
    photo_splits = _split_by_fraction(files, Path(images), val_frac, test_frac, "photographs")
    counts = _camera_counts(videos, photo_splits)
    photos = {s: [load_photo(p, image_size) for p in photo_splits[s]] for s in counts}
    attrs = {"kind": "camera", "motion": motion, "seed": seed,
             **{f"photos_{s}": len(photo_splits[s]) for s in counts}}
    with _new_file(out, force, attrs) as f:
        for split, count in counts.items():
            writer, sources = _SplitWriter(f, split), []
            for k in tqdm(range(count), desc=f"writing {split}", unit="video",
                          disable=not progress):
                rng = np.random.default_rng([seed, SPLITS.index(split), k])
                video, kind, picks = camera_video(rng, photos[split], motion, image_size,
                                                  frames)
                writer.add(video)
                sources.append(f"{kind} " + " over ".join(
                    photo_splits[split][i].relative_to(images).as_posix() for i in picks))
            f.create_dataset(f"sources/{split}", data=sources, dtype=h5py.string_dtype())
    return counts


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------

def _megabytes(nbytes):
    return f"{nbytes / 1e6:.3g} MB"


def info(path, file=None):
    """Print a table to `file` (default stdout): one row per split; then the size on disk,
    and the kind of data and its memory flags when the file records them."""
    header = ("split", "videos", "frames min/med/max", "resolution", "C", "dtype", "raw size")
    rows = []
    for split in splits_in(path):
        with VideoStore(path, split) as store:
            n = np.array(store.lengths)
            h, w, c = store.frame_shape
            rows.append((split, str(len(store)),
                         f"{n.min()}/{np.median(n):g}/{n.max()}", f"{h}x{w}", str(c), "uint8",
                         _megabytes(store.nbytes)))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)), file=file)
    shards = _shard_paths(path)
    on_disk = sum(p.stat().st_size for p in shards)
    print(f"on disk: {_megabytes(on_disk)} for all splits, compressed ({path})", file=file)
    with _open(shards[0]) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        memory = f.get(MEMORY)
        flagged = _ordered(memory) if isinstance(memory, h5py.Group) else []
    counts = {split: (sum(int(v.sum()) for v in flags), sum(len(v) for v in flags))
              for split in flagged for flags in [memory_flags(path, split)]}
    if attrs:
        print("data: " + ", ".join(f"{k}={v}" for k, v in sorted(attrs.items())), file=file)
    if counts:
        print("memory frames (an older frame needed): " + ", ".join(
            f"{split} {m} of {t} ({100 * m / max(t, 1):.1f}%)" for split, (m, t) in counts.items()),
            file=file)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _flag(parser, name, *aliases, **kwargs):
    """--some_flag, also accepted as --some-flag (the official scripts use underscores)."""
    names = [f"--{name}", *(f"--{a}" for a in aliases)]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, **kwargs)


_VIDEOS_HELP = f"""Convert video files to one HDF5 file (needs PyAV: pip install -e ".[video]").

Files: .mp4 .avi .mkv .webm .mov .gif anywhere below --data_dir (hidden files skipped).
Frames: every --every-th frame from the first, at most --max_frames per video; a phone's
display rotation is applied, then --crop cuts the frame and each cut is resized to
image_size x image_size RGB (LANCZOS, as the `frames` subcommand resizes):
  --crop squeeze  (default, as the official converter) the whole frame, aspect ratio not kept
  --crop center   the central square
  --crop tiles    the ceil(long/short) squares of the short side that cover the long side,
                  spread evenly from end to end (a 16:9 video gives 2, overlapping); each
                  tile is stored as its own video: more videos, no distortion

Splits, one of:
  DIR/train/, DIR/val/, DIR/test/ folders    each folder's videos form that split
  --split_by REGEX --test_groups G [--val_groups G]
                  group 1 of REGEX, searched in each FILE NAME, is the file's group id;
                  groups in --test_groups go to test, in --val_groups to val, all others to
                  train. G: ids and ranges, e.g. 17-25 or 1,3,5-7 or alice,bob (ids compare
                  as integers, so 01 = 1). A file name that does not match is an error.
                  KTH's split by person (1-16 train, 17-25 test):
                    --split_by 'person(\\d+)_' --test_groups 17-25
  --val_frac F --test_frac F
                  that fraction of the files, picked by a hash of each file's path below DIR
                  (deterministic, mixes subfolders), goes to val / test
  --time_split F,V [--gap G] [--test_length N]
                  split every video in TIME, for a few long videos that cannot be split by
                  file (the within-video measure): of each video's kept frames, the first
                  F (rounded) go to train, the next V to val, the rest to test; the first G
                  frames after each cut are dropped (default {DEFAULT_GAP}), so nearly identical
                  neighbouring frames are never on both sides of a cut. Train is one video
                  per file (and tile); val and test are cut into consecutive videos of N
                  frames (the end shorter than N dropped; without N, each part is one
                  video). A part too short for a video gives none. No frame is in two
                  splits. --time_split F (one fraction): F to train, the rest to test, no
                  val. E.g. --time_split 0.7,0.15 --test_length 16. Takes a flat folder
                  and none of the options above.
  none of these   every video goes to train

--test_length N, with any of these splits, cuts every val and test video into consecutive
videos of N frames (the end shorter than N dropped), so that evaluation, which predicts
from the start of each test video, gets many clips, not one a file.

A file that cannot be decoded stops the conversion with its name (nothing is written), or is
skipped and counted with --skip-bad. The output is written atomically."""


_CAMERA_HELP = f"""Videos of a virtual camera moving over real photographs: real texture whose
motion the last two frames predict. Sizes and speeds below are at 32x32 and scale with
the frame.

--motion pan       the view slides over one photo at a constant velocity, any direction
                   ({PAN_SPEED[0]:g}-{PAN_SPEED[1]:g} px a frame)
--motion zoom      the view zooms in or out at a constant rate
                   ({ZOOM_RATE[0]:g}-{ZOOM_RATE[1]:g} a frame)
--motion parallax  the camera moves sideways past two layers: the lower part of one photo,
                   cut along a wavy edge, slides over another photo, which moves the same
                   way at {DEPTH[0]:g}-{DEPTH[1]:g} of its speed
--motion mix       (default) each video one of the three at random

The view's side is {VIEW[0]:g}-{VIEW[1]:g} of the photo's short side. Each frame is that
window, at a sub-pixel position, resampled to image_size x image_size with LANCZOS over
the whole window: texture is averaged as a camera's pixels average it, not aliased.
Photos: {" ".join(IMAGE_EXTENSIONS)} anywhere below --images (hidden
files skipped; EXIF rotation applied), each with a short side of at least {MIN_SIDE} x image_size.

Splits by PHOTOGRAPH (the across-scene measure): --val_frac / --test_frac of the photos,
picked by a hash of each photo's path below --images, go to val / test, and each split's
videos use only its photos: no photo is in two splits. --videos TRAIN,VAL,TEST gives the
number of videos of each split (default 600,60,60); one number N is a total shared in
proportion to the photos. The same --seed gives the same file. /sources/<split> in the
file names each video's motion and photos, one line per video."""


def _frames_command(commands):
    """The `frames` subcommand and its flags."""
    p = commands.add_parser("frames", help="image folders -> HDF5",
                            description="Convert data_dir/{train,val,test}/<video>/<frame>.<ext> "
                            "(videos and frames in natural name order: frame_2 before frame_10) "
                            "to one HDF5 file, frames resized to image_size x image_size RGB "
                            "(LANCZOS; aspect ratio not kept).")
    _flag(p, "data_dir", required=True, help="folder holding train/, val/ and/or test/")
    _flag(p, "out", "out_dir", required=True, help="output .h5 file (--out_dir: same)")
    _flag(p, "image_size", type=int, required=True, help="frame side in pixels")
    _flag(p, "extension", default="png", help="image file extension (default png)")
    _flag(p, "force", action="store_true", help="overwrite an existing output")


def _videos_command(commands):
    """The `videos` subcommand and its flags."""
    p = commands.add_parser("videos", help="video files (.mp4 .avi .mkv .webm .mov .gif) -> "
                            "HDF5", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=_VIDEOS_HELP)
    _flag(p, "data_dir", required=True, help="folder holding the videos (searched recursively)")
    _flag(p, "out", required=True, help="output .h5 file")
    _flag(p, "image_size", type=int, required=True, help="frame side in pixels")
    _flag(p, "every", type=int, default=1, metavar="K", help="keep every K-th frame (default 1)")
    _flag(p, "max_frames", type=int, metavar="N", help="at most N frames per video (default all)")
    _flag(p, "split_by", metavar="REGEX", help="regex whose group 1 is a file's group id")
    _flag(p, "test_groups", metavar="G", help="group ids for test, e.g. 17-25")
    _flag(p, "val_groups", metavar="G", help="group ids for val, e.g. 15,16")
    _flag(p, "val_frac", type=float, default=0.0, help="fraction of files for val (default 0)")
    _flag(p, "test_frac", type=float, default=0.0, help="fraction for test (default 0)")
    _flag(p, "crop", default="squeeze", choices=CROPS,
          help="squeeze (default: whole frame), center (central square) or tiles (squares "
          "covering the long side, each its own video)")
    _flag(p, "time_split", metavar="F[,V]",
          help="split every video in time: first F of its frames to train, next V to val, "
          "the rest to test (e.g. 0.7,0.15)")
    _flag(p, "gap", type=int, metavar="G",
          help=f"with --time_split: frames dropped after each cut (default {DEFAULT_GAP})")
    _flag(p, "test_length", type=int, metavar="N",
          help="cut val and test videos into consecutive videos of N frames")
    _flag(p, "skip_bad", action="store_true", help="skip files that fail to decode")
    _flag(p, "force", action="store_true", help="overwrite an existing output")


def _npy_command(commands):
    """The `npy` subcommand and its flags."""
    p = commands.add_parser("npy", help="one .npy array of videos -> HDF5",
                            description="Convert an array of videos to HDF5. uint8 is kept; "
                            "float must lie in [0, 1] and is scaled to 0..255. Grayscale (no C "
                            "axis, or C=1) is replicated to 3 channels. All videos go to --split "
                            "except the LAST --val_frac / --test_frac of them, which go to "
                            "val / test.")
    _flag(p, "input", required=True, help="the .npy file")
    _flag(p, "out", required=True, help="output .h5 file")
    _flag(p, "layout", help="axis letters from N T H W [C]; default TNHW for 4-D (Moving "
          "MNIST), NTHWC for 5-D")
    _flag(p, "split", default="train", help="split for the videos (default train)")
    _flag(p, "val_frac", type=float, default=0.0, help="fraction of videos for val (default 0)")
    _flag(p, "test_frac", type=float, default=0.0, help="fraction for test (default 0)")
    _flag(p, "image_size", type=int, help="resize frames to this side (default: keep)")
    _flag(p, "force", action="store_true", help="overwrite an existing output")


def _synthetic_command(commands):
    """The `synthetic` subcommand and its flags."""
    p = commands.add_parser(
        "synthetic", help="bouncing balls, or an occluder over still blocks -> HDF5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""A built-in synthetic data set, 32x32 RGB by default.

--kind balls (default): 1..max_balls colored balls bouncing elastically off the walls and
    each other, anti-aliased, on black. The last two frames determine the next one.
--kind occluder: a grey bar sweeps back and forth over 1-3 still colored blocks on black,
    hiding each in turn. When a block comes back out, the two frames before showed only
    the bar there: one OLDER frame tells what appears (a memory frame). About 1 frame in 6
    is a memory frame; the file flags them per frame (/memory/<split>/<video>, read with
    data_prep.memory_flags; `info` counts them).

Split 80/10/10 into train/val/test in video order (each at least 1 video). Deterministic per
seed.""")
    _flag(p, "out", required=True, help="output .h5 file")
    _flag(p, "kind", default="balls", choices=SYNTHETIC_KINDS, help="balls (default) or occluder")
    _flag(p, "videos", type=int, default=1000, help="number of videos (default 1000)")
    _flag(p, "frames", type=int, default=32, help="frames per video (default 32)")
    _flag(p, "size", type=int, default=32, help="frame side in pixels (default 32)")
    _flag(p, "seed", type=int, default=0, help="random seed (default 0)")
    _flag(p, "max_balls", type=int, help="balls: 1..max_balls balls per video (default 3)")
    _flag(p, "speed", type=float, metavar="F", help="balls: speed factor (default 1.0; e.g. "
          "0.25 for slowly changing videos)")
    _flag(p, "force", action="store_true", help="overwrite an existing output")


def _camera_command(commands):
    """The `camera` subcommand and its flags."""
    p = commands.add_parser("camera", help="a virtual camera over photographs (pan, zoom, "
                            "parallax) -> HDF5", description=_CAMERA_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _flag(p, "images", required=True, help="folder holding the photographs (searched "
          "recursively)")
    _flag(p, "out", required=True, help="output .h5 file")
    _flag(p, "image_size", type=int, default=32, help="frame side in pixels (default 32)")
    _flag(p, "videos", default="600,60,60", metavar="N|TRAIN,VAL,TEST",
          help="videos per split (default 600,60,60), or a total")
    _flag(p, "frames", type=int, default=16, help="frames per video (default 16)")
    _flag(p, "motion", default="mix", choices=CAMERA_MOTIONS, help="pan, zoom, parallax or "
          "mix (default)")
    _flag(p, "val_frac", type=float, default=0.15, help="fraction of the photos for val "
          "(default 0.15)")
    _flag(p, "test_frac", type=float, default=0.15, help="fraction of the photos for test "
          "(default 0.15)")
    _flag(p, "seed", type=int, default=0, help="random seed (default 0)")
    _flag(p, "force", action="store_true", help="overwrite an existing output")


def _info_command(commands):
    """The `info` subcommand and its flags."""
    p = commands.add_parser("info", help="describe an HDF5 file written by data_prep",
                            description="Describe an HDF5 file (or a directory of shards): per "
                            "split, videos, frames per video, resolution, channels, dtype, "
                            "uncompressed size; then the size on disk, and the root attributes "
                            "and memory flags when the file has them.")
    p.add_argument("path", help="an .h5 file or a directory of shards")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_frames_command, _videos_command, _npy_command, _synthetic_command,
                _camera_command, _info_command):
        add(commands)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status (2 on a DataError, no traceback)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "frames":
            convert_frames(args.data_dir, args.out, args.image_size, args.extension, args.force)
        elif args.command == "videos":
            counts, skipped = convert_videos(
                args.data_dir, args.out, args.image_size, args.every, args.max_frames,
                args.val_frac, args.test_frac, args.split_by, args.val_groups,
                args.test_groups, args.skip_bad, args.force, crop=args.crop,
                time_split=args.time_split, test_length=args.test_length, gap=args.gap)
            print(f"wrote {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                  + " videos")
            if skipped:
                print(f"skipped {len(skipped)} file(s) that could not be decoded: "
                      + ", ".join(skipped), file=sys.stderr)
        elif args.command == "npy":
            convert_npy(args.input, args.out, args.layout, args.split, args.val_frac,
                        args.test_frac, args.image_size, args.force)
        elif args.command == "synthetic":
            if args.kind != "balls" and (args.max_balls is not None or args.speed is not None):
                raise DataError(f"--max_balls and --speed apply to --kind balls only; drop them "
                                f"for --kind {args.kind}")
            write_synthetic(args.out, args.videos, args.frames, args.size, args.seed,
                            args.max_balls or 3, args.force, args.kind,
                            1.0 if args.speed is None else args.speed)
        elif args.command == "camera":
            counts = write_camera(args.images, args.out, args.image_size, args.videos,
                                  args.frames, args.motion, args.val_frac, args.test_frac,
                                  args.seed, args.force)
            print(f"wrote {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                  + " videos")
        else:
            info(args.path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
