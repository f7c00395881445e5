{
  "variables": {
    "has_cuda%": "<!(command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)",
    "cuda_lib%": "<!(for d in \"${CUDA_HOME:-/nonexistent}/lib64\" /usr/local/cuda/lib64 $(ls -d /usr/local/cuda-*/lib64 2>/dev/null | sort -rV); do [ -e \"$d/libcudart_static.a\" ] && echo \"$d\" && break; done; true)"
  },
  "targets": [
    {
      "target_name": "kvrecall",
      "sources": [
        "native/addon.cc",
        "native/thread_pool.cc",
        "native/convert.cc",
        "native/attention.cc",
        "native/topk.cc",
        "native/convert_binding.cc",
        "native/attention_binding.cc",
        "native/topk_binding.cc",
        "native/attention_mass.cc",
        "native/attention_mass_binding.cc",
        "native/ra_graph.cc",
        "native/ra_graph_binding.cc",
        "native/ivf_index.cc",
        "native/kmeans.cc",
        "native/faiss_binding.cc",
        "native/cuda_binding.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-pthread", "-fopenmp", "-frtti"],
      "ldflags": ["-pthread", "-fopenmp", "-Wl,--exclude-libs,libfaiss.a", "-Wl,-z,nodelete"],
      "libraries": ["/usr/lib/x86_64-linux-gnu/libfaiss.a", "-lopenblas"],
      "conditions": [
        ["target_arch=='x64'", { "cflags_cc": ["-mavx2", "-mfma", "-mf16c"] }],
        ["has_cuda==1", {
          "defines": ["KVR_CUDA=1"],
          "sources": ["native/cuda/block_pool.cu", "native/cuda/decode_kernel.cu"],
          "rules": [{
            "rule_name": "nvcc",
            "extension": "cu",
            "inputs": ["<(RULE_INPUT_PATH)", "native/cuda/block_pool.h", "native/cuda/decode_kernel.h"],
            "outputs": ["<(INTERMEDIATE_DIR)/<(RULE_INPUT_ROOT).cu.o"],
            "action": ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-c", "<(RULE_INPUT_PATH)", "-o", "<@(_outputs)"],
            "message": "nvcc <(RULE_INPUT_PATH)",
            "process_outputs_as_sources": 1
          }],
          "libraries": ["-L<(cuda_lib)", "-lcudart_static", "-ldl", "-lrt"]
        }]
      ]
    }
  ]
}
