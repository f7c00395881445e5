{
  "variables": {
    "has_cuda%": "<!(command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)",
    "cuda_lib%": "<!(for d in \"${CUDA_HOME:-/nonexistent}/lib64\" /usr/local/cuda/lib64 $(ls -d /usr/local/cuda-*/lib64 2>/dev/null | sort -rV); do [ -e \"$d/libcudart_static.a\" ] && echo \"$d\" && break; done; true)"
  },
  "targets": [
    {
      "target_name": "kvrecall",
      "sources": [
        "native/bindings/addon.cc",
        "native/bindings/attention_binding.cc",
        "native/bindings/attention_mass_binding.cc",
        "native/bindings/block_choose_binding.cc",
        "native/bindings/block_reps_binding.cc",
        "native/bindings/block_scores_binding.cc",
        "native/bindings/checksum_binding.cc",
        "native/bindings/cluster_estimate_binding.cc",
        "native/bindings/cluster_rank_binding.cc",
        "native/bindings/cluster_summary_binding.cc",
        "native/bindings/convert_binding.cc",
        "native/bindings/copy_binding.cc",
        "native/bindings/outlier_scores_binding.cc",
        "native/bindings/socket_read_binding.cc",
        "native/bindings/shm_binding.cc",
        "native/bindings/cuda_binding.cc",
        "native/bindings/faiss_binding.cc",
        "native/bindings/ra_graph_binding.cc",
        "native/bindings/ra_scan_binding.cc",
        "native/bindings/topk_binding.cc",
        "native/bindings/wave_build_binding.cc",
        "native/bindings/wave_gpu_binding.cc",
        "native/common/thread_pool.cc",
        "native/indexes/ivf_attention.cc",
        "native/indexes/ivf_index.cc",
        "native/indexes/kmeans.cc",
        "native/indexes/ra_graph_attention.cc",
        "native/indexes/ra_graph_build.cc",
        "native/indexes/ra_graph_codec.cc",
        "native/indexes/ra_graph_keys.cc",
        "native/indexes/ra_graph_search.cc",
        "native/indexes/ra_key_codes.cc",
        "native/indexes/ra_pq_codes.cc",
        "native/indexes/ra_walk_lists.cc",
        "native/kernels/attention.cc",
        "native/kernels/attention_mass.cc",
        "native/kernels/block_choose.cc",
        "native/kernels/block_reps.cc",
        "native/kernels/cluster_estimate.cc",
        "native/kernels/cluster_rank.cc",
        "native/kernels/cluster_summary.cc",
        "native/kernels/convert.cc",
        "native/kernels/outlier_scores.cc",
        "native/kernels/topk.cc",
        "native/kernels/wave_build.cc"
      ],
      "include_dirs": ["native", "<!(node -p \"require('node-addon-api').include_dir\")"],
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
          "sources": ["native/cuda/block_pool.cu", "native/cuda/block_pool_ranges.cu", "native/cuda/decode_kernel.cu", "native/cuda/device_info.cu"],
          "sources+": ["native/cuda/block_scores.cu"],
          "rules": [{
            "rule_name": "nvcc",
            "extension": "cu",
            "inputs": ["<(RULE_INPUT_PATH)", "native/cuda/block_pool.h", "native/cuda/block_pool_impl.cuh", "native/cuda/device_info.h", "native/cuda/decode_kernel.h", "native/cuda/block_scores.h", "native/cuda/block_score_kernels.cuh", "native/cuda/wave_step.h", "native/cuda/wave_step_kernels.cuh", "native/cuda/wave_rescore.cuh", "native/cuda/wave_step_estimate.cuh", "native/cuda/wave_partial.cuh", "native/cuda/wave_step_attend.cuh", "native/cuda/wave_select.cuh", "native/cuda/step_graph.cuh", "native/cuda/kmeans_device.h", "native/indexes/key_range.h", "native/cuda/cuda_common.cuh", "native/common/half.h", "native/common/thread_pool.h", "native/cuda/wave_buffers.cuh", "native/cuda/wave_paths.cuh", "native/cuda/wave_rest.cuh", "native/cuda/wave_cache.cuh", "native/cuda/wave_page_cap.cuh", "native/cuda/wave_setup.cuh", "native/cuda/wave_sizes.cuh", "native/cuda/wave_moments.cuh", "native/cuda/wave_score_mma.cuh", "native/cuda/wave_tile_mma.cuh", "native/cuda/wave_rescore_mma.cuh", "native/cuda/mma_fragments.cuh", "native/common/moment_code.h", "native/cuda/ra_scan.h", "native/cuda/ra_scan_kernels.cuh", "native/cuda/ra_scan_select.cuh", "native/cuda/ra_scan_pq.cuh", "native/cuda/ra_attend_rows.cuh"],
            "outputs": ["<(INTERMEDIATE_DIR)/<(RULE_INPUT_ROOT).cu.o"],
            "action": ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-Inative", "-c", "<(RULE_INPUT_PATH)", "-o", "<@(_outputs)"],
            "message": "nvcc <(RULE_INPUT_PATH)",
            "process_outputs_as_sources": 1
          }],
          "libraries": ["-L<(cuda_lib)", "-lcudart_static", "-ldl", "-lrt"]
        }],
        ["has_cuda==1", {
          "sources": ["native/cuda/wave_step.cu", "native/cuda/kmeans_device.cu", "native/cuda/ra_scan.cu"]
        }]
      ]
    }
  ]
}
