"""Build of cpeft's extension modules: cpeft._C, and cpeft._torch_node where torch is installed.

Sources are globbed: csrc/common/*.c (compute code both backends share), csrc/cpu/*.c (compute,
CPU), csrc/py/*.c (the Python boundary) and, when CUDA is enabled, cuda/*.cu compiled by nvcc into
objects linked into the same module (without CUDA, cuda/no_cuda.c stands in for them).
cpeft._torch_node (csrc/torch/*.cpp) is the torch layers' C++ autograd node for LoRA linear on the
CPU; it links the torch found at build time and calls cpeft._C's compute functions, so it is
optional: without it (no torch when building, or another torch at run time) the layers take their
Python autograd.Function, which gives the same results.

Environment:
  CPEFT_CUDA=auto|0|1   auto (default): build CUDA kernels when nvcc, cuBLAS and cuda/*.cu exist;
                        1: require them; 0: CPU only.
  CPEFT_CUDA_ARCHS      compute capabilities, e.g. "80;90" (default), "8.0 9.0" or "sm_80,sm_90";
                        SASS for each and PTX for the newest.
  CPEFT_TORCH=auto|0|1  auto (default): build cpeft._torch_node when torch can be imported;
                        1: require it; 0: skip it.
  CPEFT_DEBUG=1         -O0 -g -UNDEBUG.
  CPEFT_SANITIZE=1      AddressSanitizer and UBSan on the C sources (compile and link).
"""

import concurrent.futures
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def openblas():
    import scipy_openblas32

    version = ".".join(scipy_openblas32.__version__.split(".")[:3])
    return dict(
        include=scipy_openblas32.get_include_dir(),
        lib_dir=scipy_openblas32.get_lib_dir(),
        library=scipy_openblas32.get_library(),
        summary=f"scipy-openblas32 {version}",
    )


def parse_archs(text):
    archs = []
    for token in re.split(r"[;,\s]+", text.strip()):
        digits = token.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not digits.isdigit():
            raise SystemExit(f"CPEFT_CUDA_ARCHS: cannot read {token!r} (expected e.g. 80;90)")
        archs.append(int(digits))
    if not archs:
        raise SystemExit("CPEFT_CUDA_ARCHS is empty (expected e.g. 80;90)")
    return sorted(set(archs))


def cuda_home_of(nvcc):
    """The toolkit root: CUDA_HOME, else nvcc's grandparent (nvcc may be a wrapper script
    elsewhere on PATH, so fall back to /usr/local/cuda when that has no runtime header)."""
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def find_library_dir(home, name):
    for sub in (
        "lib64",
        "lib",
        os.path.join("targets", "x86_64-linux", "lib"),
        os.path.join("targets", "sbsa-linux", "lib"),
    ):
        if glob.glob(os.path.join(home, sub, f"lib{name}.so*")):
            return os.path.join(home, sub)
    return None


def find_cublas(home):
    """cuBLAS headers and the cuBLAS and cuBLASLt libraries (IA3's output scaling is a cuBLASLt
    GEMM): in the toolkit, or (toolkits installed without it) in the nvidia-cublas wheel's
    nvidia/cu13 (or nvidia/cublas) folder. The wheel ships only versioned sonames, so the link
    name is then the exact file."""
    roots = [home]
    for entry in __import__("sys").path:
        roots += [os.path.join(entry, "nvidia", "cu13"), os.path.join(entry, "nvidia", "cublas")]
    for root in roots:
        include = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(include, "cublas_v2.h")):
            continue
        lib_dir = find_library_dir(root, "cublas")
        if lib_dir is None:
            continue
        libs = {}
        for name in ("cublas", "cublasLt"):
            plain = os.path.join(lib_dir, f"lib{name}.so")
            versioned = sorted(glob.glob(os.path.join(lib_dir, f"lib{name}.so.*")))
            libs[name] = (
                name
                if os.path.exists(plain)
                else (":" + os.path.basename(versioned[0]) if versioned else None)
            )
        if None in libs.values():
            continue
        return dict(include=include, lib_dir=lib_dir, libs=libs, in_wheel=root != home)
    return None


def find_cuda():
    """(config, None) when CUDA is to be built, (None, reason) when not."""
    mode = os.environ.get("CPEFT_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None, "disabled by CPEFT_CUDA=0"
    if mode not in ("auto", "1", "on", "true", "yes"):
        raise SystemExit(f"CPEFT_CUDA must be auto, 0 or 1, got {mode!r}")
    required = mode != "auto"

    def unavailable(reason):
        if required:
            raise SystemExit(f"cpeft build: CPEFT_CUDA=1 but {reason}")
        return None, reason

    home_env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which(os.path.join(home_env, "bin", "nvcc")) if home_env else None
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return unavailable("nvcc not found")
    home = cuda_home_of(nvcc)
    if home is None:
        return unavailable(f"no CUDA toolkit headers next to {nvcc}")
    cu_sources = sources("cuda/*.cu")
    if not cu_sources:
        return unavailable("no cuda/*.cu sources")
    cudart_dir = find_library_dir(home, "cudart")
    if cudart_dir is None:
        return unavailable(f"libcudart not found under {home}")
    cublas = find_cublas(home)
    if cublas is None:
        return unavailable(
            f"cuBLAS and cuBLASLt not found in {home} nor in an installed nvidia-cublas wheel"
        )
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    archs = parse_archs(os.environ.get("CPEFT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    return dict(
        nvcc=nvcc,
        home=home,
        lib_dir=cudart_dir,
        cublas=cublas,
        version=match.group(1) if match else "?",
        archs=archs,
        sources=cu_sources,
    ), None


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = archs[-1]
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


DEBUG = env_flag("CPEFT_DEBUG")
SANITIZE = env_flag("CPEFT_SANITIZE")
BLAS = openblas()
CUDA, CUDA_OFF_REASON = find_cuda()
HEADERS = (
    sources("csrc/include/cpeft/*.h")
    + sources("csrc/py/*.h")
    + sources("csrc/cpu/*.h")
    + sources("csrc/cpu/*.inc")
)

c_sources = sources("csrc/common/*.c") + sources("csrc/cpu/*.c") + sources("csrc/py/*.c")
compile_args = ["-std=c11", "-O2", "-Wall"]
link_args = ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"]
macros = [
    ("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION"),
    ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION"),
    ("PY_ARRAY_UNIQUE_SYMBOL", "cpeft_ARRAY_API"),
    ("CPEFT_BUILD_BLAS", f'"{BLAS["summary"]}"'),
]
include_dirs = ["csrc/include", "csrc/py", BLAS["include"]]
library_dirs = [BLAS["lib_dir"]]
libraries = [BLAS["library"]]
if DEBUG:
    compile_args += ["-O0", "-g", "-UNDEBUG"]
    macros.append(("CPEFT_BUILD_DEBUG", "1"))
if SANITIZE:
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    compile_args += sanitize
    link_args += sanitize
if CUDA:
    archs_text = ";".join(f"sm_{a}" for a in CUDA["archs"])
    macros += [
        ("CPEFT_WITH_CUDA", "1"),
        ("CPEFT_BUILD_CUDA_VERSION", f'"{CUDA["version"]}"'),
        ("CPEFT_BUILD_CUDA_ARCHS", f'"{archs_text}"'),
    ]
    cublas = CUDA["cublas"]
    include_dirs += [os.path.join(CUDA["home"], "include"), cublas["include"]]
    library_dirs += [CUDA["lib_dir"], cublas["lib_dir"]]
    libraries += ["cudart", cublas["libs"]["cublas"], cublas["libs"]["cublasLt"], "stdc++"]
    link_args += [
        f"-Wl,-rpath,{CUDA['lib_dir']}",
        f"-Wl,-rpath,{cublas['lib_dir']}",
        "-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib",
    ]
    SUMMARY = (
        f"cpeft build: CUDA on (nvcc {CUDA['version']}, {archs_text}) | BLAS {BLAS['summary']}"
    )
else:
    c_sources.append(os.path.join("cuda", "no_cuda.c"))
    SUMMARY = f"cpeft build: CUDA off ({CUDA_OFF_REASON}) | BLAS {BLAS['summary']}"


def find_torch():
    """(config, None) when cpeft._torch_node is to be built, (None, reason) when not."""
    mode = os.environ.get("CPEFT_TORCH", "auto").strip().lower()
    if mode == "0":
        return None, "disabled by CPEFT_TORCH=0"
    if mode not in ("auto", "1"):
        raise SystemExit(f"CPEFT_TORCH must be auto, 0 or 1, got {mode!r}")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if mode == "1":
            raise SystemExit(
                f"cpeft build: CPEFT_TORCH=1 but torch cannot be imported ({error})"
            ) from error
        return None, "torch not importable at build time"
    lib_dirs = cpp_extension.library_paths()
    return (
        dict(
            required=mode == "1",
            version=torch.__version__,
            include_dirs=cpp_extension.include_paths(),
            lib_dirs=lib_dirs,
            cxx11_abi=int(torch._C._GLIBCXX_USE_CXX11_ABI),
        ),
        None,
    )


TORCH, TORCH_OFF_REASON = find_torch()
SUMMARY += (
    f" | torch node: built against torch {TORCH['version']}"
    if TORCH
    else f" | torch node: off ({TORCH_OFF_REASON})"
)


# -g0 unless debugging: debug info for torch's headers makes the node's compile about 1.6 times
# longer and its module 25 times larger (9 MB), for a few hundred lines of our own.
node_compile_args = (
    ["-std=c++20", "-Wall", "-fvisibility=hidden"]
    + ([] if DEBUG else ["-g0"])
    + [a for a in compile_args if a not in ("-std=c11", "-Wall")]
)
# torch's libraries are found through torch's own folder next to cpeft's, or where the build
# found them.
node_link_args = [
    "-Wl,-rpath,$ORIGIN/../torch/lib",
    *(f"-Wl,-rpath,{d}" for d in (TORCH["lib_dirs"] if TORCH else [])),
    *(a for a in link_args if a.startswith("-fsanitize")),
]


def build_configuration(numpy_version):
    """Everything besides the sources that goes into the binary: the interpreter (its
    environment), numpy and BLAS versions, the CUDA toolkit and cuBLAS locations (they become
    RUNPATH entries), flags and libraries. Search paths of the build-time numpy and BLAS headers
    are left out on purpose: pip's isolated builds put them in a fresh temporary folder each time,
    and the same versions give the same binary."""
    return dict(
        python=sys.executable,
        ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"),
        numpy=numpy_version,
        blas=[BLAS["summary"], BLAS["library"]],
        cuda=CUDA and {k: v for k, v in CUDA.items() if k != "sources"},
        debug=DEBUG,
        sanitize=SANITIZE,
        compile_args=compile_args,
        link_args=link_args,
        macros=macros,
        libraries=libraries,
        torch=TORCH,
        node_compile_args=node_compile_args,
        node_link_args=node_link_args,
    )


def configuration_key(configuration):
    text = json.dumps(configuration, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


class BuildExt(build_ext):
    """Compiles cuda/*.cu with nvcc (when enabled) into objects linked into cpeft._C.

    A build never reuses what another configuration built (issue 12, defect 14): objects go to a
    build_temp subfolder named by the configuration's hash, and an existing module file is
    rebuilt unless this configuration recorded its exact digest (a module left by a CUDA build
    in another environment, or by an older setup.py, is newer than the sources, which is all
    setuptools' own up-to-date check looks at)."""

    def finalize_options(self):
        super().finalize_options()
        import numpy

        self.configuration_key = configuration_key(build_configuration(numpy.__version__))
        self.build_temp = os.path.join(self.build_temp, f"config-{self.configuration_key}")
        self.skipped_extensions = set()

    def run(self):
        print(f"{SUMMARY} | configuration {self.configuration_key}", flush=True)
        import numpy

        for ext in self.extensions:
            ext.include_dirs.append(numpy.get_include())
        super().run()

    def output_stamp(self, output):
        name = hashlib.sha256(os.path.abspath(output).encode()).hexdigest()[:16]
        return os.path.join(self.build_temp, "outputs", name)

    def built_here(self, output):
        """Whether ``output`` is exactly the file this configuration last built there."""
        stamp = self.output_stamp(output)
        if not os.path.exists(stamp):
            return False
        with open(stamp) as handle:
            return handle.read().strip() == file_digest(output)

    def build_extension(self, ext):
        if ext.name == "cpeft._torch_node" and not TORCH["required"]:
            # Optional: a torch whose headers this file does not compile against leaves the
            # layers on their Python autograd.Function, never without cpeft.
            from setuptools.errors import CompileError, LinkError

            try:
                self.build_native_extension(ext)
            except (CompileError, LinkError) as error:
                print(f"cpeft build: cpeft._torch_node skipped ({error})", flush=True)
                self.skipped_extensions.add(ext.name)
            return
        self.build_native_extension(ext)

    def build_native_extension(self, ext):
        if CUDA and ext.name == "cpeft._C":
            ext.extra_objects = self.compile_cuda()
        output = self.get_ext_fullpath(ext.name)
        foreign = os.path.exists(output) and not self.built_here(output)
        if foreign:
            print(
                f"cpeft build: {output} was not built by this configuration; rebuilding", flush=True
            )
        force = self.force
        self.force = force or foreign
        try:
            super().build_extension(ext)
        finally:
            self.force = force
        if os.path.exists(output):
            stamp = self.output_stamp(output)
            os.makedirs(os.path.dirname(stamp), exist_ok=True)
            with open(stamp, "w") as handle:
                handle.write(file_digest(output))

    def copy_extensions_to_source(self):
        # A module this build skipped must not be left there from an earlier build.
        for ext in [e for e in self.extensions if e.name in self.skipped_extensions]:
            stale = os.path.join(ROOT, "python", self.get_ext_filename(ext.name))
            if os.path.exists(stale):
                os.remove(stale)
            self.extensions.remove(ext)
        # --inplace copies from build_lib only when the copy there is newer than the module in
        # the source tree, which may well come from another configuration: always copy.
        force, self.force = self.force, True
        try:
            super().copy_extensions_to_source()
        finally:
            self.force = force

    def compile_cuda(self):
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = [
            "-O3",
            "-std=c++17",
            "-Xcompiler",
            "-fPIC",
            "-I",
            os.path.join(ROOT, "csrc", "include"),
            "-I",
            CUDA["cublas"]["include"],
            *gencode_flags(CUDA["archs"]),
        ]
        flags += ["-g", "-lineinfo", "-UNDEBUG"] if DEBUG else ["-DNDEBUG"]
        deps = HEADERS + sources("cuda/*.cuh")
        newest_dep = max((os.path.getmtime(os.path.join(ROOT, p)) for p in deps), default=0.0)
        objects, commands = [], []
        for src in CUDA["sources"]:
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
            stale = (
                self.force
                or not os.path.exists(obj)
                or os.path.getmtime(obj)
                < max(os.path.getmtime(os.path.join(ROOT, src)), newest_dep)
            )
            if stale:
                commands.append([CUDA["nvcc"], *flags, "-c", os.path.join(ROOT, src), "-o", obj])
            objects.append(obj)

        def run(cmd):
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)

        # One nvcc per .cu file, `build_ext -j N` of them at once (one at a time without -j).
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel or 1) as pool:
            list(pool.map(run, commands))
        return objects


extensions = [
    Extension(
        "cpeft._C",
        sources=c_sources,
        depends=HEADERS + sources("cuda/*.cu") + sources("cuda/*.cuh"),
        include_dirs=include_dirs,
        define_macros=macros,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]
if TORCH:
    extensions.append(
        Extension(
            "cpeft._torch_node",
            sources=sources("csrc/torch/*.cpp"),
            depends=HEADERS,
            include_dirs=["csrc/include", *TORCH["include_dirs"]],
            define_macros=[
                ("CPEFT_TORCH_VERSION", json.dumps(TORCH["version"])),
                ("_GLIBCXX_USE_CXX11_ABI", str(TORCH["cxx11_abi"])),
            ],
            library_dirs=TORCH["lib_dirs"],
            libraries=["c10", "torch", "torch_cpu", "torch_python"],
            language="c++",
            extra_compile_args=node_compile_args,
            extra_link_args=node_link_args,
        )
    )

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExt},
)
