"""cid_jax: ConsistentID (identity-preserving portrait generation) in JAX/Flax."""
from setuptools import find_packages, setup

# Tested versions are pinned in requirements/constraints.txt; these are the ranges we support.
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "absl-py>=2.5.1",
    "numpy>=2.0",
    "safetensors>=0.8.0",
    "pillow>=11.0",
    "regex",
    "tqdm",
    "tensorboardX>=2.6",
    "scikit-image>=0.26",  # offline frontal-face detector and real test photos
    "scipy",               # hole filling of region masks
    "matplotlib>=3.9",     # loss curves
    "gcsfs>=2026.10.1",    # gs:// paths through etils epath / fsspec (runs, data, weights on GCS)
]

EXTRAS = {
    # tf.data input pipeline and the tfds builder for FGID records.
    "data": ["tensorflow-cpu>=2.21.0", "tensorflow-datasets>=4.9.10"],
    # Dataset builds at scale as Apache Beam pipelines (DirectRunner locally, Dataflow/Flink/Spark).
    # It caps protobuf < 7, pillow < 13 and pyarrow < 26; the constraints lock versions that fit.
    "beam": ["apache-beam>=2.77"],
    # PyTorch parity references and export checks. Exactly 2.13.0: other specs pull a CUDA build here.
    "torch": ["torch==2.13.0", "diffusers>=0.42", "transformers>=5.0"],
    # Face detection and ArcFace embeddings through insightface (needs opencv-python, not headless).
    "face": ["insightface>=2.1", "onnxruntime>=1.31", "opencv-python", "onnx"],
    # Ahead-of-time compilation for TPU topologies on a CPU machine.
    "tpu": ["libtpu"],
    # The web demo (python -m cid_jax.app) and its programmatic client.
    "app": ["gradio>=6.0", "gradio_client>=2.0"],
    # Tests; the browser test drives Debian's chromium + chromedriver through selenium; the pod-path
    # tests run a GCS JSON-API emulator on 127.0.0.1.
    "dev": ["pytest>=8", "pytest-xdist>=3.6", "selenium>=4.20", "gcp-storage-emulator>=2026.7.19"],
}
EXTRAS["all"] = sorted({d for k, deps in EXTRAS.items() if k != "tpu" for d in deps})

setup(
    name="cid_jax",
    version="0.1.0",
    description="ConsistentID in JAX/Flax: train identity adapters on TPU/GPU, export to PyTorch",
    packages=find_packages(include=["cid_jax", "cid_jax.*"]),
    package_data={"cid_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
