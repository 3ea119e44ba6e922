// Load a TorchScript file written by `cifarlab export` and print the top-1 class of each image.
//   infer MODEL.pt IMAGES.f32 N
// IMAGES.f32: N x 3 x 32 x 32 float32 values (little-endian, normalized like the lab's test transform).
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: infer MODEL.pt IMAGES.f32 N\n";
    return 2;
  }
  const long n = std::stol(argv[3]);
  std::vector<float> pixels(static_cast<size_t>(n) * 3 * 32 * 32);
  std::ifstream in(argv[2], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size() * sizeof(float)))) {
    std::cerr << "infer: " << argv[2] << " holds fewer than " << n << " images of 3x32x32 float32\n";
    return 2;
  }
  torch::jit::script::Module module;
  try {
    module = torch::jit::load(argv[1]);
  } catch (const c10::Error& e) {
    std::cerr << "infer: cannot load " << argv[1] << ": " << e.what_without_backtrace() << "\n";
    return 2;
  }
  module.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor batch = torch::from_blob(pixels.data(), {n, 3, 32, 32}, torch::kFloat32);
  torch::Tensor logits = module.forward({batch}).toTensor();
  torch::Tensor top1 = logits.argmax(1);
  for (long i = 0; i < n; ++i) {
    std::printf("image %ld: top-1 %ld (logit %.6f)\n", i, top1[i].item<long>(), logits[i][top1[i]].item<float>());
  }
  return 0;
}
