"""The configuration tests/test_train.py trains with, as a config file for the CLI."""
from tests.helpers import train_config


def get_config():
    c = train_config("", 5)
    c.train.export_at_end = False
    return c
