"""Everything is in pyproject.toml but the one file setuptools cannot place from there: the
start-up `.pth` (see safe_redirect/spawn.py), which goes to the root of site-packages."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "safe_redirect.pth"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
