# cpp/tools: octavo_bench, BENCH.md's workloads with no Python. Built with the tests (a CPU smoke
# run is one of them) or with OCTAVO_BUILD_TOOLS, and installed: next to the library, or on PATH
# from the Python wheel.
option(OCTAVO_BUILD_TOOLS "Build and install cpp/tools (octavo_bench)" ON)
if(OCTAVO_BUILD_TOOLS OR OCTAVO_BUILD_TESTS)
  add_executable(octavo_bench ${PROJECT_SOURCE_DIR}/cpp/tools/octavo_bench.cc)
  # A tool of this tree, not an outside program: it reads the internal headers (backend memory,
  # random weights, the KV block size) as the tests do.
  target_include_directories(octavo_bench PRIVATE ${PROJECT_SOURCE_DIR}/cpp/src ${PROJECT_SOURCE_DIR}/cpp/tools)
  target_link_libraries(octavo_bench PRIVATE octavo)
  if(OCTAVO_WITH_CUDA)
    set_target_properties(octavo_bench PROPERTIES BUILD_RPATH "${OCTAVO_CUBLAS_LIBRARY_DIR}"
                                                  INSTALL_RPATH "${OCTAVO_CUBLAS_LIBRARY_DIR}")
  endif()
  if(OCTAVO_BUILD_TOOLS)
    if(SKBUILD)
      # The wheel's scripts directory: `octavo_bench` is on PATH after pip install. It finds
      # cuBLAS where this build found it (the toolkit, or the nvidia-cublas wheel).
      install(TARGETS octavo_bench RUNTIME DESTINATION ${SKBUILD_SCRIPTS_DIR})
    else()
      install(TARGETS octavo_bench RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
    endif()
  endif()
endif()

if(OCTAVO_BUILD_TESTS)
  if(TARGET test_octavo_bench)
    target_include_directories(test_octavo_bench PRIVATE ${PROJECT_SOURCE_DIR}/cpp/tools)
  endif()
  # Seconds on the CPU: a random tiny model, a custom workload of 4 requests with 6 output tokens
  # each; the JSON must report all 24 tokens, no failed request, and the executor's time split
  # (a device wait, and no graphs on the CPU).
  add_test(NAME octavo_bench_smoke
    COMMAND octavo_bench --random-model ${PROJECT_SOURCE_DIR}/tests/cpp/data/tiny_spec.json
            --workload custom --num-prompts 4 --input-len 8:40 --output-len 6 --device cpu
            --num-kv-blocks 64 --json)
  set_tests_properties(octavo_bench_smoke PROPERTIES
    PASS_REGULAR_EXPRESSION "\"output_tokens\": 24, \"failed_requests\": 0,.*\"device_wait_s\": [0-9]+\\.[0-9]+, \"graph_captures\": 0, \"async_steps\": 0, \"graph_capture_s\": 0\\.000,")
  add_test(NAME octavo_bench_rejects_bad_arguments
    COMMAND octavo_bench --random-model ${PROJECT_SOURCE_DIR}/tests/cpp/data/tiny_spec.json --input-len 9:3)
  set_tests_properties(octavo_bench_rejects_bad_arguments PROPERTIES
    PASS_REGULAR_EXPRESSION "--input-len is '9:3'; LO must not exceed HI")
endif()
