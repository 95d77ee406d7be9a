"""scoredistill: a threestudio extension pack for text-to-3D score distillation.

Install PyTorch first (``pip install torch==2.13.0`` was the tested CPU build), then
``pip install -e .[test]``.  The package lives in ``custom/scoredistill`` so that a
threestudio checkout can load it from its ``custom/`` folder as well.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.1",
    "numpy>=1.24",
    "diffusers>=0.35.2,<0.43",
    "transformers>=4.44,<6",
    "huggingface_hub>=0.24,<3",
    "accelerate>=0.30",
    "peft>=0.12",
    "gsplat>=1.4,<1.6",
    "packaging",  # gsplat JIT-compiles its CUDA kernels with it but does not declare it
    "nerfacc>=0.5.3,<0.6",
    "pytorch-lightning>=2.0,<2.7",
    "omegaconf>=2.3,<2.5",
    "jaxtyping>=0.2.20",
    "typeguard>=2.13",
    "plyfile>=1.0",
    "trimesh>=4.0",
    "PyMCubes>=0.1.4",  # marching cubes of the gsplat-mesh-exporter (as threestudio)
    "xatlas>=0.0.9",  # UV atlas of the gsplat-mesh-exporter
    "fast-simplification>=0.1.7",  # quadric decimation through trimesh (Trimesh.simplify_quadric_decimation)
    "Pillow>=9.0",  # texture PNG of the gsplat-mesh-exporter
    "imageio>=2.28",
    "matplotlib>=3.7",
    "torchmetrics>=1.0",  # PSNR / SSIM of the ground-truth 3D benchmark (scoredistill.bench.gt3d_bench)
    "scipy>=1.10",
    "submitit>=1.5",  # prompt suites on SLURM (scoredistill.suite)
    "PyYAML>=6.0",  # suite files (scoredistill.suite)
]

TEST_REQUIRES = [
    "pytest>=7.4",
    "tomesd>=0.1.3",  # token_merging option of the guidance base (tests/test_guidance_memory.py)
]

setup(
    name="scoredistill",
    version="0.1.0",
    description="threestudio extension pack: GE3D, LODS, DreamMapping VDM, UDS, HiFA and 3D Gaussians on gsplat",
    # the configs and the ground-truth scenes travel in a wheel as data folders of the package (a checkout uses
    # configs/ and load/gt_scenes/ in place: scoredistill.paths), and so do the CPU stand-ins (no Python package)
    package_dir={"": "custom", "scoredistill.pack_configs": "configs", "scoredistill.pack_scenes": "load/gt_scenes"},
    packages=find_packages("custom") + ["scoredistill.pack_configs", "scoredistill.pack_scenes"],
    package_data={"scoredistill": ["testing/cpu_stubs/**/*"], "scoredistill.pack_configs": ["*.yaml"],
                  "scoredistill.pack_scenes": ["*.ply"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "memory": ["tomesd>=0.1.3"]},
    entry_points={"console_scripts": ["scoredistill=scoredistill.cli:main"]},
)
