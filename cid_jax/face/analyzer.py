"""What generation, data preparation and evaluation need from a photo: its parsing map and its
identity embedding, each from a model when one is given, else from the offline fallbacks (each
fallback announced once).

    FaceAnalyzer(parser_weights=None, insightface_models=None)
      .label_map(image, size)   19-class map: BiSeNet (a face must be found first), or the offline
                                detector + geometric template
      .id_embedding(image)      ArcFace (512,) from insightface, or None (the caller uses zeros, as
                                the reference does without a detected face)
"""
from __future__ import annotations

import logging
import pathlib
from typing import Optional

import numpy as np

from cid_jax import errors

log = logging.getLogger(__name__)


class FaceAnalyzer:
    """Parsing map and ID embedding of a photo, with the offline fallbacks announced once."""

    def __init__(self, parser_weights: Optional[str] = None, insightface_models: Optional[str] = None):
        self.parser = None
        self.embedder = None
        if parser_weights:
            path = pathlib.Path(parser_weights).expanduser()
            if not path.exists():
                raise errors.MissingError(f"face parsing weights {path} not found; expected BiSeNet's 79999_iter.pth "
                                          "(also published as face_parsing.pth)")
            from cid_jax.face.bisenet import load_bisenet

            self.parser = load_bisenet(path)
        else:
            log.warning("no --parser_weights: detecting the face with scikit-image's LBP cascade and "
                        "using the geometric part template (lower fidelity than BiSeNet parsing)")
        if insightface_models:
            from cid_jax.face.arcface import ArcFaceEmbedder

            self.embedder = ArcFaceEmbedder(insightface_models)
        else:
            log.warning("no --insightface_models: using a zero ID embedding (as the reference does "
                        "without a detected face); identity will come from the CLIP features only")

    def label_map(self, image: np.ndarray, size: int = 512) -> np.ndarray:
        """The parsing map at `size` x `size` (the references parse at 512 for SD1.5, 1280 for SDXL)."""
        from cid_jax.face.detect import detect_largest_face, template_parse
        from cid_jax.face.parsing import parse_face

        if self.parser is None:
            return template_parse(image, size=size)
        detect_largest_face(image)  # refuse photos without a face before trusting the parser
        return parse_face(image, *self.parser, size=size)

    def id_embedding(self, image: np.ndarray) -> Optional[np.ndarray]:
        return None if self.embedder is None else self.embedder.embed(image)
