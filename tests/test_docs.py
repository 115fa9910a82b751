"""The generated reference and sample match the code, and the sample is valid."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import TestCase

from netlab import configdoc
from netlab.config import SECTIONS, keys, load

from .support import temporary_directory


class GeneratedFilesTests(TestCase):
    def test_configuration_reference_is_current(self) -> None:
        """docs/configuration.rst is what `python -m netlab.configdoc` generates."""
        self.assertEqual(
            configdoc.RST_PATH.read_text(),
            configdoc.render_rst(),
            "run `python -m netlab.configdoc` and commit the result",
        )

    def test_sample_is_current(self) -> None:
        """etc/netlab.toml is what `python -m netlab.configdoc` generates."""
        self.assertEqual(
            configdoc.SAMPLE_PATH.read_text(),
            configdoc.render_sample(),
            "run `python -m netlab.configdoc` and commit the result",
        )

    def test_sample_validates_as_shipped(self) -> None:
        """The shipped sample loads without error and names every key."""
        config = load(configdoc.SAMPLE_PATH)
        text = configdoc.SAMPLE_PATH.read_text()
        for section in SECTIONS:
            self.assertIn(f"[{section}]", text)
            for info in keys(section):
                self.assertRegex(text, rf"(?m)^#? ?{info.name} = ", f"[{section}]")
        self.assertEqual(config.path, configdoc.SAMPLE_PATH)

    def test_effective_configuration_round_trips(self) -> None:
        """`netlab config` output is a valid configuration that loads to the same."""
        original = load(None)
        path = temporary_directory(self) / "effective.toml"
        path.write_text(configdoc.render_effective(original))
        self.assertEqual(attrs.evolve(load(path), path=None), original)
