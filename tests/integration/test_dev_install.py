"""A developer's install: ``pip install -e .`` registers the twistd plugin."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EditableInstallTests(SynchronousTestCase):
    """An editable install into a fresh prefix makes ``twistd activecall`` known from any directory."""

    def test_editable_install_finds_the_plugin(self) -> None:
        """pip install -e . (no deps, into a temp prefix): a python using that site sees the activecall ServiceMaker."""
        prefix = tempfile.mkdtemp()
        # --ignore-installed: pip must not uninstall the activecall this test suite itself runs from.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                        "--prefix", prefix, "-e", REPO], check=True, timeout=300, capture_output=True)
        [site] = glob.glob(os.path.join(prefix, "lib", "python*", "site-packages"))
        probe = (
            "import site, sys; site.addsitedir(sys.argv[1]);"
            "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
        )
        # Run outside the checkout, without PYTHONPATH: only the editable install can point at it.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", probe, site], check=True, timeout=120, capture_output=True,
                             text=True, cwd=prefix, env=env).stdout
        self.assertIn("'activecall'", out)
