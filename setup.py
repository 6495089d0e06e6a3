"""Build the optional Cython kernels in sabot/ext.

Each kernel has a pure-Python twin, so a machine without a C compiler (or
without Cython) still gets a working install. A failed compile is reported
once, as one message, and the install goes on without that kernel.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _extensions():
    try:
        import numpy
        from Cython.Build import cythonize
        from Cython.Compiler import Options
    except ImportError as exc:
        print(f"sabot: Cython kernels skipped ({exc}); the pure-Python twins will be used",
              file=sys.stderr)
        return []

    from setuptools import Extension

    # Warnings are errors so an unused variable or a possibly uninitialized
    # one in a kernel is fixed at once rather than noticed in a profile.
    Options.warning_errors = True
    directives = {"warn.unused": True, "warn.unused_arg": False,
                  "warn.maybe_uninitialized": True}

    # The kernels read Arrow arrays through the Arrow C Data Interface
    # (sabot/ext/_arrow_c.pxd), a frozen C ABI, so they need neither
    # pyarrow's headers (pa.get_include()) nor its libraries.
    modules = []
    for path in sorted(glob.glob(os.path.join("sabot", "ext", "_*.pyx"))):
        name = path[:-4].replace(os.sep, ".")
        extension = Extension(
            name,
            [path],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3"],
        )
        # One module at a time, so a Cython error in one kernel leaves the
        # others built; sabot.ext uses the twins unless all of them import.
        try:
            modules.extend(cythonize([extension], language_level=3,
                                     compiler_directives=directives, quiet=True))
        except Exception as exc:  # noqa: BLE001 - Cython's CompileError and its kin
            print(f"sabot: Cython failed on {path} ({exc}; its errors are printed above); "
                  f"the pure-Python twins will be used", file=sys.stderr)
    return modules


class OptionalBuildExt(build_ext):
    """Build each extension, keeping the install working when one fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure is optional here
            self._report(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._report(exc, ext.name)

    @staticmethod
    def _report(exc, name="the Cython kernels"):
        print(
            f"sabot: could not compile {name} ({exc}); "
            "the pure-Python twin will be used. Install a C compiler and "
            "Python headers, then reinstall, to get the compiled kernels.",
            file=sys.stderr,
        )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
