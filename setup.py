"""Package metadata for fqt_compile.

``passes/`` is a top-level folder of the repository that installs as ``fqt_compile.passes``
(see ``package_dir``), so graph passes live apart from the library modules but are imported as
one package.
"""

from setuptools import setup

setup(
    name="fqt_compile",
    version="0.1.0",
    description="Fully quantized training (FQT) for PyTorch as a torch.compile backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["fqt_compile", "fqt_compile.passes"],
    package_dir={"fqt_compile": "fqt_compile", "fqt_compile.passes": "passes"},
    install_requires=["torch>=2.5"],
    extras_require={
        "dev": ["pytest>=7", "hypothesis>=6", "numpy", "scikit-learn>=1.3", "transformers>=4.40", "build", "wheel"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript", "pydot"],
        "plots": ["matplotlib>=3.7"],
        "examples": ["numpy", "scikit-learn>=1.3"],
    },
    entry_points={
        "torch_dynamo_backends": [
            "fqt = fqt_compile.backend:fqt_backend",
            "fqt_eager = fqt_compile.backend:fqt_eager_backend",
        ],
        "console_scripts": ["fqt-compile = fqt_compile.__main__:main"],
    },
)
