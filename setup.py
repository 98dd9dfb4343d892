"""Build pyckpt: the Python package plus its native extensions, ``pyckpt._core``, ``pyckpt._ring``
and ``pyckpt._tensors``, and ``pyckpt._api``, the C++ API's library (no Python in it).

``pip install --no-build-isolation .`` compiles the extension against the installed torch
(build isolation would download torch again). ``PYCKPT_BUILD_EXT=0`` installs pure Python.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """pyckpt._core: the C++ core with pybind11 only (no torch, so it loads in milliseconds).
    pyckpt._ring: the pinned-ring loader for accelerators, a torch extension.
    pyckpt._tensors: host storages and tensors made in bulk, a torch extension."""
    if os.environ.get("PYCKPT_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        return [], {}
    import pybind11
    from setuptools import Extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    def sources(*folders):
        return sorted(
            os.path.relpath(path, ROOT)
            for folder in folders
            for path in glob.glob(os.path.join(ROOT, "csrc", folder, "*.cpp"))
        )

    flags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    core = Extension(
        name="pyckpt._core",
        sources=["csrc/bindings/bindings.cpp", "csrc/bindings/py_tree.cpp", "csrc/bindings/py_zip.cpp",
                 "csrc/bindings/io_bindings.cpp",
                 *sources("core", "index", "io")],
        include_dirs=[os.path.join(ROOT, "csrc"), pybind11.get_include()],
        extra_compile_args=["-std=c++17", *flags],
        language="c++",
    )
    ring = CppExtension(
        name="pyckpt._ring",
        sources=["csrc/bindings/ring_bindings.cpp", *sources("device"), "csrc/core/byte_source.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=flags,
    )
    tensors = CppExtension(
        name="pyckpt._tensors",
        sources=["csrc/bindings/tensor_bindings.cpp", "csrc/bindings/direct_load.cpp", *sources("materialize"),
                 "csrc/core/byte_source.cpp", "csrc/index/zip_index.cpp", "csrc/io/crc32.cpp", "csrc/io/parallel_read.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=flags,
    )
    # pyckpt._api: the C++ API and its TorchScript ops. Linked against libtorch but not
    # libtorch_python (CppExtension would add it), so a C++ program can load it without Python;
    # Python reaches it through torch.ops.load_library, never import.
    from torch.utils.cpp_extension import include_paths, library_paths

    torch_libs = library_paths()
    api = Extension(
        name="pyckpt._api",
        sources=[*sources("api"), "csrc/device/ring_loader.cpp", "csrc/core/byte_source.cpp",
                 "csrc/index/zip_index.cpp", "csrc/index/pickle_vm.cpp", "csrc/index/json_value.cpp",
                 "csrc/index/safetensors_index.cpp", "csrc/index/shard_index.cpp", "csrc/io/crc32.cpp",
                 "csrc/io/parallel_read.cpp", "csrc/io/mapped_file.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "pyckpt", "include"), *include_paths()],
        library_dirs=torch_libs,
        runtime_library_dirs=torch_libs,
        libraries=["c10", "torch", "torch_cpu"],
        extra_compile_args=flags,  # BuildExtension adds the C++ standard torch's headers need
        language="c++",
    )
    return [core, ring, tensors, api], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pyckpt",
    version="0.1.0",
    description="Load, rename and convert PyTorch checkpoints fast, without running pickle",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pyckpt", "pyckpt.*"]),
    package_data={"pyckpt": ["py.typed", "include/pyckpt/*.h", "share/cmake/pyckpt/*.cmake"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "safetensors", "omegaconf", "transformers", "huggingface_hub"], "safetensors": ["safetensors"]},
    entry_points={"console_scripts": ["pyckpt=pyckpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
