// Streams a completion from dprouter, reads the served rank, and checks Health.
//
//   build/cpp/generate 127.0.0.1:50051 "The capital of France is"
//
// The stubs are generated from protos/ by `make stubs` (protoc with
// grpc_cpp_plugin) and built against Debian's libgrpc++; see the Makefile.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <iostream>
#include <string>

#include "dprouter/v1/generate.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace {

using dprouter::v1::GenerateRequest;
using dprouter::v1::GenerateResponse;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

std::string Header(const grpc::ClientContext& context, const std::string& key) {
  const auto& header = context.GetServerInitialMetadata();
  auto found = header.find(key);
  return found == header.end() ? "" : std::string(found->second.data(), found->second.size());
}

std::chrono::system_clock::time_point Deadline(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

// Returns the status name of one Health name, or the RPC error.
std::string CheckHealth(grpc::health::v1::Health::Stub& health, const std::string& service) {
  grpc::ClientContext context;
  context.set_deadline(Deadline(10));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  grpc::Status status = health.Check(&context, request, &response);
  if (!status.ok()) return "error: " + status.error_message();
  return HealthCheckResponse::ServingStatus_Name(response.status());
}

}  // namespace

int main(int argc, char** argv) {
  std::string address = argc > 1 ? argv[1] : "127.0.0.1:50051";
  std::string prompt = argc > 2 ? argv[2] : "The capital of France is";
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto generate = dprouter::v1::GenerateService::NewStub(channel);

  GenerateRequest request;
  request.set_prompt(prompt);
  request.mutable_sampling()->set_max_tokens(8);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_sampling()->set_ignore_eos(true);

  grpc::ClientContext context;
  context.set_deadline(Deadline(60));
  auto reader = generate->Generate(&context, request);
  GenerateResponse response;
  int rank = -1;
  while (reader->Read(&response)) {
    // The first response names the rank; the response headers say it too
    // (they have arrived once a response has).
    if (response.has_data_parallel_rank()) {
      rank = response.data_parallel_rank();
      std::cout << "rank: " << rank << " (x-data-parallel-rank: "
                << Header(context, "x-data-parallel-rank")
                << ", x-route-reason: " << Header(context, "x-route-reason") << ")\n";
    }
    std::cout << response.text() << std::flush;
    if (response.has_usage()) {
      std::string reason = dprouter::v1::FinishReason_Name(response.finish_reason());
      std::cout << "\nfinish: " << reason.substr(sizeof("FINISH_REASON_") - 1) << ", "
                << response.usage().completion_tokens() << " tokens\n";
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    std::cerr << "error: " << status.error_code() << ": " << status.error_message() << "\n";
    return 1;
  }

  auto health = grpc::health::v1::Health::NewStub(channel);
  std::string overall = CheckHealth(*health, "");
  std::string of_rank = CheckHealth(*health, "rank/" + std::to_string(rank));
  std::cout << "health: " << overall << " (rank/" << rank << ": " << of_rank << ")\n";
  return overall == "SERVING" ? 0 : 1;
}
