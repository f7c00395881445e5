// The native graph behind a JS RaGraph (ra_graph_binding.cc), for bindings
// that take a graph as an argument (ra_scan_binding.cc) without reaching
// into its class.
#pragma once

#include <napi.h>

#include <memory>
#include <string>

#include "indexes/ra_graph.h"

namespace kvr {

// v's graph; a TypeError unless v is a live RaGraph (`what` names the argument).
std::shared_ptr<const RaGraph> RaGraphOf(Napi::Env env, const Napi::Value& v, const std::string& what);

}  // namespace kvr
