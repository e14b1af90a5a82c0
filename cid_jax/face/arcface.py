"""ArcFace identity embeddings through insightface (the FaceID input of ConsistentID, spec §6 step 1).

The reference builds `FaceAnalysis(name="buffalo_l")` (SCRFD-10GF detector `det_10g.onnx` + ArcFace
R50 `w600k_r50.onnx`), `prepare(ctx_id=0, det_size=(640, 640))`, and takes
`faces[0].normed_embedding`. Here the models come from a local folder: insightface accepts a
directory as `name` and then loads every `*.onnx` in it, choosing each model's task from its
input/output signature (not its file name): >= 5 outputs -> detection (SCRFD); a square input of
112+ px (multiple of 16) -> recognition (ArcFace). Only those two tasks are loaded.

Two documented differences from the reference, each with a switch to reproduce it:

* Colour order. insightface takes OpenCV-style **BGR** images (both SCRFD and ArcFace swap to RGB
  internally). The reference's SD1.5 inference passed `np.array(PIL_image)`, i.e. RGB, by mistake;
  its training data (cv2.imread) and its SDXL inference were BGR. `embed` takes RGB like the rest of
  this package and converts to BGR; `reference_rgb_quirk=True` passes the RGB array through
  unchanged, reproducing the SD1.5 inference embeddings.
* Which face. `faces[0]` is the highest-scoring detection, not necessarily the subject. We embed the
  **largest** box (`pick="largest"`); `pick="first"` reproduces the reference.

The reference silently uses a zero embedding when no face is found; we raise `NoFaceFoundError`.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from cid_jax import errors
from cid_jax.face.detect import FaceBox, no_face_error

log = logging.getLogger(__name__)

# The buffalo_l pack, as unzipped from insightface's release: the two files used, and the rest.
BUFFALO_L_REQUIRED = {
    "det_10g.onnx": "detection: SCRFD-10GF face detector (boxes + 5 keypoints)",
    "w600k_r50.onnx": "recognition: ArcFace ResNet-50 trained on WebFace600K (512-d embedding)",
}
BUFFALO_L_UNUSED = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")
PICKS = ("largest", "first")


class ArcFaceModelsError(errors.MissingError):
    """The insightface model folder lacks a detector or a recognizer; names the files expected."""


def _models_error(model_dir: pathlib.Path, missing_tasks: Sequence[str]) -> ArcFaceModelsError:
    present = sorted(p.name for p in model_dir.glob("*.onnx")) if model_dir.is_dir() else []
    missing_files = [f for f in BUFFALO_L_REQUIRED if f not in present]
    expected = "; ".join(f"{name} ({what})" for name, what in BUFFALO_L_REQUIRED.items())
    return ArcFaceModelsError(
        f"insightface found no {' or '.join(missing_tasks)} model in {model_dir} "
        f"(it holds: {', '.join(present) if present else 'no .onnx files'}). Expected the buffalo_l "
        f"layout there: {expected}. Missing by name: {', '.join(missing_files) or 'none'} "
        "(insightface picks models by their input/output signature, so a renamed file also works). "
        "Unzip buffalo_l.zip from the insightface model releases into that folder.")


class ArcFaceEmbedder:
    """`embed(image_rgb) -> (512,) float32` L2-normalised ArcFace embedding of the largest face.

    Args:
      model_dir: local folder with the buffalo_l ONNX files (at least det_10g.onnx, w600k_r50.onnx).
      det_size: SCRFD input size (the reference: (640, 640) for SD1.5, (512, 512) for SDXL).
      det_thresh: detection score threshold (insightface's default 0.5).
      ctx_id: insightface context; < 0 forces onnxruntime's CPU provider.
      providers: onnxruntime providers (default: insightface's choice, CUDA first when present).
      reference_rgb_quirk: feed insightface RGB, as the reference SD1.5 inference did (module doc).
      pick: 'largest' (default) or 'first' (the reference's highest-score `faces[0]`).
    """

    def __init__(self, model_dir: os.PathLike | str, *, det_size=(640, 640), det_thresh: float = 0.5,
                 ctx_id: int = 0, providers=None, reference_rgb_quirk: bool = False,
                 pick: str = "largest"):
        model_dir = pathlib.Path(model_dir).expanduser()
        if not model_dir.is_dir():
            # Not a folder: insightface would take the string as a model-pack name and download it.
            raise ArcFaceModelsError(
                f"insightface model folder {model_dir} does not exist; expected a folder holding "
                + ", ".join(BUFFALO_L_REQUIRED) + " (the buffalo_l pack)")
        from insightface.app import FaceAnalysis

        try:
            app = FaceAnalysis(name=str(model_dir), allowed_modules=["detection", "recognition"],
                               providers=providers)
        except AssertionError:  # insightface asserts a detector was found, with no message
            raise _models_error(model_dir, ["detection"]) from None
        if "recognition" not in app.models:
            raise _models_error(model_dir, ["recognition"])
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=tuple(det_size))
        self.model_dir = model_dir
        self._setup(app.det_model, app.models["recognition"], reference_rgb_quirk, pick)

    @classmethod
    def from_models(cls, detector, recognizer, *, reference_rgb_quirk: bool = False,
                    pick: str = "largest") -> "ArcFaceEmbedder":
        """Wraps already-built insightface models (`detector.detect(img, max_num=, metric=)` ->
        (bboxes [N, 5], kps [N, 5, 2]); `recognizer.get(img, face)`, e.g. `ArcFaceONNX`)."""
        self = cls.__new__(cls)
        self.model_dir = None
        self._setup(detector, recognizer, reference_rgb_quirk, pick)
        return self

    def _setup(self, detector, recognizer, reference_rgb_quirk: bool, pick: str):
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
        self.detector = detector
        self.recognizer = recognizer
        self.reference_rgb_quirk = bool(reference_rgb_quirk)
        self.pick = pick

    def to_insightface_input(self, image_rgb) -> np.ndarray:
        """RGB uint8 [H, W, 3] -> the array handed to insightface (BGR, or RGB under the quirk)."""
        img = np.asarray(image_rgb)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3], got shape {img.shape} dtype {img.dtype}")
        return np.ascontiguousarray(img if self.reference_rgb_quirk else img[..., ::-1])

    def analyze(self, image_rgb) -> tuple[np.ndarray, FaceBox]:
        """(embedding (D,) float32 with unit L2 norm, the chosen face's box)."""
        from insightface.app.common import Face

        img = self.to_insightface_input(image_rgb)
        bboxes, kpss = self.detector.detect(img, max_num=0, metric="default")
        if bboxes is None or len(bboxes) == 0:
            raise no_face_error(img.shape, "insightface's detector")
        if self.pick == "largest":
            i = int(np.argmax((bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])))
        else:
            i = 0
        if len(bboxes) > 1:
            x0, y0, x1, y1 = (int(v) for v in bboxes[i, :4])
            log.info("%d faces in the photo; the identity comes from the %s one (box x %d..%d, y %d..%d)",
                     len(bboxes), "largest" if self.pick == "largest" else "first detected", x0, x1, y0, y1)
        if kpss is None:
            raise ValueError("the detector returned no keypoints; ArcFace alignment needs 5 of them")
        face = Face(bbox=bboxes[i, :4], kps=kpss[i], det_score=bboxes[i, 4])
        self.recognizer.get(img, face)
        emb = np.asarray(face.normed_embedding, np.float32).reshape(-1)
        x0, y0, x1, y1 = bboxes[i, :4]
        h, w = img.shape[:2]  # SCRFD boxes may reach past the border
        box = FaceBox(max(0, int(np.floor(x0))), max(0, int(np.floor(y0))),
                      min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1))))
        return emb, box

    def embed(self, image_rgb) -> np.ndarray:
        """(512,) float32 normed ArcFace embedding of the chosen face; `NoFaceFoundError` if none."""
        return self.analyze(image_rgb)[0]
