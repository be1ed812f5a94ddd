#!/usr/bin/env bash
# Builds the two third-party OpenAI-compatible servers that docs/remote-servers.md was tried against, from
# one PyPI package: the source distribution of llama-cpp-python, which vendors llama.cpp's whole tree
# (tools/server included). llama.cpp is compiled once, as shared libraries, and serves both:
#   $DEST/bin/llama-server                 llama.cpp's HTTP server
#   $DEST/bin/llama-cpp-python-server      llama-cpp-python[server] (its own venv, on the same libraries)
# Nothing is downloaded but PyPI packages (the sdist, then the server extra's dependencies into the venv).
# About 20-40 minutes on 2 busy cores.
#
#   bench/thirdparty/build_llama.sh
#
# Environment: LOGITFUSE_THIRDPARTY (default ~/.cache/logitfuse/thirdparty), LLAMA_CPP_PYTHON_VERSION
# (default 0.3.36), JOBS (default: the number of cores), PYTHON (default python3, >= 3.9, with pip and venv).
# GGML_NATIVE=OFF builds for a generic x86-64 rather than for the build machine's own CPU features, so the
# binaries run on any machine of the same kind; the embedded web UI is left out (it would be downloaded).
set -euo pipefail

DEST=${LOGITFUSE_THIRDPARTY:-$HOME/.cache/logitfuse/thirdparty}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
SDIST="$DEST/src/llama_cpp_python-$VERSION.tar.gz"
SRC="$DEST/src/llama_cpp_python-$VERSION"
BUILD="$DEST/build/llama.cpp-$VERSION"
mkdir -p "$DEST/src" "$DEST/bin"

# 1. the source distribution (pip download never builds or installs anything)
[ -f "$SDIST" ] || "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST/src"
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$DEST/src"

# 2. llama.cpp from the vendored tree: the libraries llama-cpp-python loads, and llama-server
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF
cmake --build "$BUILD" --target llama-server llama mtmd -j "$JOBS"
ln -sf "$BUILD/bin/llama-server" "$DEST/bin/llama-server"
"$DEST/bin/llama-server" --version 2>&1 | tail -n 2

# 3. llama-cpp-python[server] in its own venv, without compiling llama.cpp again (LLAMA_BUILD=OFF: the
#    package loads the libraries of step 2 through LLAMA_CPP_LIB_PATH, which the wrapper sets)
[ -x "$DEST/venv/bin/python" ] || "$PYTHON" -m venv "$DEST/venv"
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$DEST/venv/bin/pip" install -q "llama-cpp-python[server] @ file://$SDIST"
cat > "$DEST/bin/llama-cpp-python-server" <<WRAP
#!/usr/bin/env bash
# llama-cpp-python's OpenAI-compatible server on the llama.cpp libraries built beside it
export LLAMA_CPP_LIB_PATH="$BUILD/bin"
exec "$DEST/venv/bin/python" -m llama_cpp.server "\$@"
WRAP
chmod +x "$DEST/bin/llama-cpp-python-server"
LLAMA_CPP_LIB_PATH="$BUILD/bin" "$DEST/venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "built into $DEST/bin"
