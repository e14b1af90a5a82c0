"""FGID data: record format, tfds builders, synthetic faces, shared preprocessing, tf.data pipeline.

Light modules (numpy/PIL only, used by inference too): `masks`, `clip_preprocess`, `sample`,
`synthetic`, `features`. Heavy ones import TensorFlow and are imported explicitly:
`cid_jax.data.builder` (tensorflow_datasets) and `cid_jax.data.pipeline` (tf.data).
See README.md in this folder for the record format and the batch layout.
"""
