"""Face analysis: parsing (BiSeNet), detection, ArcFace identity embeddings, and `FaceAnalyzer`,
which picks a model or its offline fallback for each (generation, data preparation, evaluation).

With weights:   `load_bisenet(path)` + `parse_face(image, model, params)`  -> 19-class label map
                `ArcFaceEmbedder(buffalo_l_dir).embed(image)`               -> (512,) FaceID embedding
Without:        `template_parse(image)` -> the same kind of label map from skimage's offline face
                cascade and a geometric template (`detect.py`), so region masks and part images are
                built unchanged.
Every path raises `NoFaceFoundError` (a ValueError) when the photo has no usable face.

insightface is imported only when an `ArcFaceEmbedder` is built (it is the optional 'face' extra).
"""
from cid_jax.face.parsing import (  # noqa: F401  (parsing first: detect uses its label ids)
    LABEL_NAMES, NUM_LABELS, REFERENCE_NAMES, label_maps, parse_batch, parse_face, resize_like_reference,
)
from cid_jax.face.bisenet import BiSeNet, bisenet_key, load_bisenet, params_from_state_dict  # noqa: F401
from cid_jax.face.detect import (  # noqa: F401
    FaceBox, NoFaceFoundError, TEMPLATE, detect_faces, detect_largest_face, template_label_map,
    template_parse,
)
from cid_jax.face.arcface import ArcFaceEmbedder, ArcFaceModelsError  # noqa: F401
from cid_jax.face.analyzer import FaceAnalyzer  # noqa: F401
