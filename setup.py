"""setup.py: the package is pure Python; the C++/CUDA extension is built on first use (JIT), or ahead of
time when asked:

    pip install --no-build-isolation -e .                          # Python only; csrc/ JIT-built on first use
    ADAPTERFUSE_BUILD_EXT=1 pip install --no-build-isolation -e .  # also build adapterfuse._ext now

--no-build-isolation matters for the extension: it must be compiled against the torch already
installed, and build isolation would download a different torch (gigabytes). torch is therefore not
a build requirement in pyproject.toml.
"""
import json
import os
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (adapterfuse/_csrc) so a wheel can still JIT-build the extension."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "adapterfuse" / "_csrc", dirs_exist_ok=True)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("ADAPTERFUSE_BUILD_EXT", "0") == "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cfg = runpy.run_path(str(ROOT / "adapterfuse" / "_build.py"))
    with_cuda = cfg["want_cuda"]()
    ext_cls = CUDAExtension if with_cuda else CppExtension
    native = os.environ.get("ADAPTERFUSE_NATIVE", "0") == "1"  # -march=native: only for this machine
    ext_modules = [ext_cls(
        name="adapterfuse._ext",
        sources=[os.path.relpath(s, ROOT) for s in cfg["sources"](with_cuda)],
        extra_compile_args={"cxx": cfg["cxx_flags"](with_cuda, native), "nvcc": cfg["nvcc_flags"]()},
        extra_link_args=cfg["ld_flags"](),
    )]

    class BuildExtWithVersions(BuildExtension):
        """Record the torch / CUDA versions next to the extension; the loader refuses a mismatch."""

        def run(self):
            super().run()
            for ext in self.extensions:
                out = Path(self.get_ext_fullpath(ext.name)).parent / cfg["AOT_INFO_NAME"]
                out.write_text(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda}))

    cmdclass["build_ext"] = BuildExtWithVersions

setup(ext_modules=ext_modules, cmdclass=cmdclass)
