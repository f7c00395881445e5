{
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
        "native/faiss_binding.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-pthread", "-fopenmp", "-frtti"],
      "ldflags": ["-pthread", "-fopenmp", "-Wl,--exclude-libs,libfaiss.a", "-Wl,-z,nodelete"],
      "libraries": ["/usr/lib/x86_64-linux-gnu/libfaiss.a", "-lopenblas"],
      "conditions": [
        ["target_arch=='x64'", { "cflags_cc": ["-mavx2", "-mfma", "-mf16c"] }]
      ]
    }
  ]
}
