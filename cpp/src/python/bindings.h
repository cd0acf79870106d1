// One function per binding file; module.cc calls them all. Bindings convert and forward only.
#pragma once

#include <nanobind/nanobind.h>

void bind_kv_cache(nanobind::module_& m);
void bind_ops(nanobind::module_& m);
void bind_ops_attention(nanobind::module_& ops);
void bind_ops_elementwise(nanobind::module_& ops);
void bind_ops_sampling(nanobind::module_& ops);
void bind_engine(nanobind::module_& m);
void bind_async_engine(nanobind::module_& m);
void bind_safetensors(nanobind::module_& m);
void bind_model_dir(nanobind::module_& m);
