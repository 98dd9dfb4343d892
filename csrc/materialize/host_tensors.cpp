#include "materialize/host_tensors.h"

#include <c10/core/CPUAllocator.h>

#include <set>
#include <tuple>
#include <utility>

#include "io/parallel_read.h"

namespace pyckpt::materialize {
namespace {

void release_base(void* base) { c10::raw::intrusive_ptr::decref(static_cast<c10::StorageImpl*>(base)); }

}  // namespace

std::vector<at::Storage> slice_storage(const at::Storage& base, const std::vector<ByteRange>& ranges) {
  c10::StorageImpl* impl = base.unsafeGetStorageImpl();
  uint8_t* data = static_cast<uint8_t*>(base.mutable_data());
  const uint64_t nbytes = base.nbytes();
  std::vector<at::Storage> result;
  result.reserve(ranges.size());
  for (const ByteRange& range : ranges) {
    TORCH_CHECK(range.offset <= nbytes && range.length <= nbytes - range.offset,
                "storage slice [", range.offset, ", +", range.length, ") passes the end of ", nbytes, " bytes");
    c10::raw::intrusive_ptr::incref(impl);  // each slice holds the base, as torch's slices do
    at::DataPtr pointer(data + range.offset, impl, release_base, base.device());
    result.emplace_back(c10::Storage::use_byte_size_t(), static_cast<int64_t>(range.length), std::move(pointer),
                        /*allocator=*/nullptr, /*resizable=*/false);
  }
  return result;
}

at::Storage new_host_storage(uint64_t nbytes) {
  return at::Storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes), c10::GetCPUAllocator(),
                     /*resizable=*/true);
}

std::vector<at::Storage> read_storages(const ByteSource& source, const std::vector<ByteRange>& ranges, int threads) {
  std::vector<at::Storage> result;
  result.reserve(ranges.size());
  std::vector<ReadJob> jobs;
  jobs.reserve(ranges.size());
  c10::Allocator* allocator = c10::GetCPUAllocator();
  for (const ByteRange& range : ranges) {
    result.emplace_back(c10::Storage::use_byte_size_t(), static_cast<int64_t>(range.length), allocator,
                        /*resizable=*/true);
    if (range.length > 0) {
      jobs.push_back({range.offset, range.length, static_cast<uint8_t*>(result.back().mutable_data())});
    }
  }
  parallel_read(source, jobs, threads);
  return result;
}

std::vector<at::Tensor> make_tensors(const std::vector<at::Storage>& storages, const std::vector<TensorSpec>& specs) {
  std::vector<at::Tensor> result;
  result.reserve(specs.size());
  for (const TensorSpec& spec : specs) {
    const at::Storage& storage = storages.at(spec.storage);
    at::Tensor tensor = at::empty({0}, at::TensorOptions().dtype(spec.dtype).device(storage.device()));
    tensor.set_(storage, spec.storage_offset, spec.size, spec.stride);
    if (spec.requires_grad) tensor.set_requires_grad(true);
    result.push_back(std::move(tensor));
  }
  return result;
}

bool fillable(const at::Tensor& target, at::ScalarType dtype, const std::vector<int64_t>& size) {
  return target.defined() && target.layout() == at::kStrided && target.device().is_cpu() &&
         !target.is_quantized() && target.scalar_type() == dtype && target.sizes().vec() == size &&
         target.is_contiguous() && !target.is_conj() && !target.is_neg();
}

void fill_directly(const std::vector<SourceFills>& files, int threads) {
  std::vector<SourceReads> reads;
  reads.reserve(files.size());
  std::set<std::tuple<const void*, size_t, uint64_t>> scheduled;
  for (size_t file = 0; file < files.size(); ++file) {
    SourceReads& read = reads.emplace_back(SourceReads{files[file].source, {}});
    for (const DirectFill& fill : files[file].fills) {
      const uint64_t nbytes = fill.target.nbytes();
      uint8_t* dest = static_cast<uint8_t*>(fill.target.mutable_data_ptr());
      if (nbytes == 0 || !scheduled.emplace(dest, file, fill.file_offset).second) continue;
      read.jobs.push_back({fill.file_offset, nbytes, dest});
    }
  }
  parallel_read(reads, threads);
}

}  // namespace pyckpt::materialize
