"""ssl-pretrain: distributed self-supervised pretraining of visual encoders."""

from setuptools import find_packages, setup

# Pinned: an unpinned torch resolves to a multi-GB CUDA build on machines without one on disk; the rest are the set
# known to install and work together (mlflow 3.17 needs pyarrow < 26).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "ray[default,train]==2.60.0",
    "nvidia-dali-cuda120==2.4.0",
    "webdataset==1.0.2",
    "triton==3.9.0",
    "mlflow==3.17.2",
    "pyarrow==25.0.1",
    "scikit-learn>=1.5",
    "scipy>=1.11",  # ranks for the evaluation's AUROCs (scikit-learn depends on it too)
    "pyyaml>=6",
    "pillow>=10",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "numpy>=1.26",
    "psutil>=5.9",  # MLflow's system metrics (CPU, memory, disk, network)
    "nvidia-ml-py>=12",  # ... and the GPUs' through NVML (the driver's library; without it no GPU rows)
]

setup(
    name="ssl-pretrain",
    version="0.1.0",
    description="Distributed self-supervised pretraining (SimCLR, DINO, MAE, ...) with Ray Train, DeepSpeed, DALI",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "kernels", "kernels.*", "data_pipeline",
                                    "data_pipeline.*", "cluster", "cluster.*"]),
    include_package_data=True,
    package_data={"cluster": ["templates/*"]},
    install_requires=INSTALL_REQUIRES,
    # kubernetes-validate: Kubernetes' own OpenAPI schemas, to check the manifests `pretrain submit k8s` writes;
    # pg8000: a PostgreSQL driver (pure Python) for the test of a database tracking store's preflight
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "kubernetes-validate>=1.37",
                            "pg8000>=1.31"]},
    entry_points={"console_scripts": ["pretrain=pretrain.cli:main"]},
)
